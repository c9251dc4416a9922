"""The registry audit as a pure function: one exact test per kind of problem."""

from __future__ import annotations

from baton.shared.registry import (
    RequestRecord,
    RequestState,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerReport,
    audit,
)


def worker(wid: str, role: str) -> WorkerRecord:
    info = WorkerInfo(wid, role, f"{wid}:50051", f"{wid}:7000", "tiny", 16, 64)
    return WorkerRecord(info=info, load=WorkerLoad(60, 1, 0), heartbeat_at=1000.0)


def record(rid: str, state: RequestState, decode: str = "d1", prefill: str = "p1") -> RequestRecord:
    owner = prefill if state is RequestState.PREFILLING else decode
    prefill = "" if state is RequestState.RESERVED else prefill
    return RequestRecord(rid, state, owner, decode, prefill, 4, 1000.0, 1001.0)


def report(
    wid: str,
    role: str,
    *rids: str,
    held: int | None = None,
    accounted: int | None = None,
    error: str | None = None,
) -> WorkerReport:
    blocks = 4 * len(rids)
    return WorkerReport(
        worker_id=wid,
        role=role,
        request_ids=rids,
        integrity_error=error,
        num_held_blocks=blocks if held is None else held,
        num_request_blocks=blocks if accounted is None else accounted,
    )


WORKERS = [worker("d1", "decode"), worker("p1", "prefill")]


def test_a_consistent_cluster_is_clean() -> None:
    requests = [
        record("r-res", RequestState.RESERVED),
        record("r-pre", RequestState.PREFILLING),
        record("r-dec", RequestState.DECODING),
    ]
    reports = {
        "d1": report("d1", "decode", "r-res", "r-pre", "r-dec"),
        "p1": report("p1", "prefill", "r-pre"),  # r-dec already handed off: P let go, that's fine
    }
    assert audit(WORKERS, requests, reports) == []


def test_an_idle_cluster_is_clean() -> None:
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill")}
    assert audit(WORKERS, [], reports) == []


def test_prefill_worker_may_still_report_a_request_just_handed_off() -> None:
    reports = {"d1": report("d1", "decode", "r"), "p1": report("p1", "prefill", "r")}
    assert audit(WORKERS, [record("r", RequestState.DECODING)], reports) == []


def test_unreachable_worker_is_reported_and_not_cross_checked() -> None:
    reports = {"d1": "connection refused", "p1": report("p1", "prefill")}
    problems = audit(WORKERS, [record("r", RequestState.DECODING)], reports)
    assert problems == ["worker d1: unreachable: connection refused"]


def test_live_worker_without_a_report() -> None:
    problems = audit(WORKERS, [], {"d1": report("d1", "decode")})
    assert problems == ["worker p1: live in the registry but not audited (no report)"]


def test_report_from_a_worker_without_a_lease() -> None:
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill"), "d9": report("d9", "decode")}
    assert audit(WORKERS, [], reports) == ["worker d9: reported, but has no live lease in the registry"]


def test_report_identity_and_role_must_match_the_registry() -> None:
    reports = {"d1": report("d2", "prefill"), "p1": report("p1", "prefill")}
    assert audit(WORKERS, [], reports) == [
        "worker d1: its report is for worker d2",
        "worker d1: registered as decode but reports role prefill",
    ]


def test_integrity_error() -> None:
    reports = {"d1": report("d1", "decode", error="block 7: refcount -1"), "p1": report("p1", "prefill")}
    assert audit(WORKERS, [], reports) == [
        "worker d1: allocator integrity check failed: block 7: refcount -1"
    ]


def test_held_blocks_beyond_what_requests_account_for_is_a_leak() -> None:
    reports = {"d1": report("d1", "decode", "r", held=6, accounted=4), "p1": report("p1", "prefill")}
    problems = audit(WORKERS, [record("r", RequestState.DECODING)], reports)
    assert problems == ["worker d1: 6 blocks held but its requests account for 4 (leak of 2 blocks)"]


def test_requests_accounting_for_more_than_is_held() -> None:
    reports = {"d1": report("d1", "decode", "r", held=3, accounted=4), "p1": report("p1", "prefill")}
    problems = audit(WORKERS, [record("r", RequestState.DECODING)], reports)
    assert problems == ["worker d1: its requests account for 4 blocks but only 3 are held"]


def test_prefill_worker_holding_blocks_for_no_request_is_a_leak() -> None:
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill", held=2, accounted=0)}
    assert audit(WORKERS, [], reports) == [
        "worker p1: 2 blocks held but its requests account for 0 (leak of 2 blocks)"
    ]


def test_decode_worker_holding_blocks_with_no_requests() -> None:
    reports = {"d1": report("d1", "decode", held=5, accounted=0), "p1": report("p1", "prefill")}
    assert audit(WORKERS, [], reports) == ["decode worker d1: holds 5 blocks but reports no requests"]


def test_record_whose_owner_is_not_live() -> None:
    requests = [record("r", RequestState.DECODING, decode="d9")]
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill")}
    assert audit(WORKERS, requests, reports) == ["request r (decoding): owner d9 is not a live worker"]


def test_prefilling_record_whose_owner_or_decode_worker_is_not_live() -> None:
    requests = [
        record("r1", RequestState.PREFILLING, prefill="p9"),
        record("r2", RequestState.PREFILLING, decode="d9"),
    ]
    reports = {"d1": report("d1", "decode", "r1"), "p1": report("p1", "prefill", "r2")}
    assert audit(WORKERS, requests, reports) == [
        "request r1 (prefilling): owner p9 is not a live worker",
        "request r2 (prefilling): decode worker d9 is not a live worker",
    ]


def test_reserved_or_decoding_record_its_decode_worker_does_not_report() -> None:
    requests = [record("r1", RequestState.RESERVED), record("r2", RequestState.DECODING)]
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill")}
    assert audit(WORKERS, requests, reports) == [
        "request r1 (reserved): decode worker d1 does not report it",
        "request r2 (decoding): decode worker d1 does not report it",
    ]


def test_prefilling_record_its_prefill_worker_does_not_report() -> None:
    reports = {"d1": report("d1", "decode", "r"), "p1": report("p1", "prefill")}
    problems = audit(WORKERS, [record("r", RequestState.PREFILLING)], reports)
    assert problems == ["request r (prefilling): prefill worker p1 does not report it"]


def test_prefilling_record_its_decode_worker_does_not_report() -> None:
    reports = {"d1": report("d1", "decode"), "p1": report("p1", "prefill", "r")}
    problems = audit(WORKERS, [record("r", RequestState.PREFILLING)], reports)
    assert problems == ["request r (prefilling): decode worker d1 does not report it"]


def test_reported_request_without_a_record() -> None:
    reports = {"d1": report("d1", "decode", "ghost"), "p1": report("p1", "prefill", "phantom")}
    assert audit(WORKERS, [], reports) == [
        "worker d1: reports request ghost, which has no record",
        "worker p1: reports request phantom, which has no record",
    ]


def test_reported_request_whose_record_names_other_workers() -> None:
    workers = [*WORKERS, worker("p2", "prefill")]
    requests = [record("r1", RequestState.PREFILLING), record("r2", RequestState.RESERVED)]
    reports = {
        "d1": report("d1", "decode", "r1", "r2"),
        "p1": report("p1", "prefill", "r1"),
        "p2": report("p2", "prefill", "r1", "r2"),
    }
    assert audit(workers, requests, reports) == [
        "worker p2: reports request r1, whose record names owner p1, decode worker d1, prefill worker p1",
        "worker p2: reports request r2, whose record names owner d1, decode worker d1, prefill worker (none)",
    ]


def test_problems_are_ordered_workers_then_records_then_reports() -> None:
    requests = [record("r", RequestState.DECODING, decode="d9")]
    reports = {"d1": report("d1", "decode", "x", error="bad"), "p1": "timeout"}
    assert audit(WORKERS, requests, reports) == [
        "worker d1: allocator integrity check failed: bad",
        "worker p1: unreachable: timeout",
        "request r (decoding): owner d9 is not a live worker",
        "worker d1: reports request x, which has no record",
    ]
