"""Compare the registry with each worker's own account of its allocator (I1, I2, I3 across processes).

Pure: the caller reads the registry (`live_workers`, `live_requests`) and gathers a `WorkerReport`
from each live worker over gRPC. The snapshots are not taken atomically, so a request that starts or
ends while they are gathered can show up once; a problem that persists across two audits is real.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from baton.shared.registry.records import RequestRecord, RequestState, WorkerRecord, WorkerReport


def audit(
    workers: Sequence[WorkerRecord],
    requests: Sequence[RequestRecord],
    reports: Mapping[str, WorkerReport | str],
) -> list[str]:
    """Human-readable problems, workers first, then records, then reported requests; [] means clean.

    `reports[worker_id]` is the worker's report, or a string saying why it could not be reached.
    """
    live = {w.info.worker_id: w for w in workers}
    problems: list[str] = []
    reachable: dict[str, WorkerReport] = {}
    for wid in sorted(live):
        report = reports.get(wid)
        if report is None:
            problems.append(f"worker {wid}: live in the registry but not audited (no report)")
        elif isinstance(report, str):
            problems.append(f"worker {wid}: unreachable: {report}")
        else:
            reachable[wid] = report
            problems.extend(_check_worker(live[wid], report))
    for wid in sorted(set(reports) - set(live)):
        problems.append(f"worker {wid}: reported, but has no live lease in the registry")
    problems.extend(_check_records(requests, live, reachable))
    problems.extend(_check_reported(requests, reachable))
    return problems


def _check_worker(record: WorkerRecord, report: WorkerReport) -> list[str]:
    """One worker's report on its own: identity, allocator integrity, held vs accounted blocks."""
    wid = record.info.worker_id
    problems = []
    if report.worker_id != wid:
        problems.append(f"worker {wid}: its report is for worker {report.worker_id}")
    if report.role != record.info.role:
        problems.append(f"worker {wid}: registered as {record.info.role} but reports role {report.role}")
    if report.integrity_error is not None:
        problems.append(f"worker {wid}: allocator integrity check failed: {report.integrity_error}")
    held, accounted = report.num_held_blocks, report.num_request_blocks
    if report.role == "decode" and not report.request_ids and held > 0:
        problems.append(f"decode worker {wid}: holds {held} blocks but reports no requests")
    elif held > accounted:
        problems.append(
            f"worker {wid}: {held} blocks held but its requests account for {accounted}"
            f" (leak of {held - accounted} blocks)"
        )
    elif held < accounted:
        problems.append(f"worker {wid}: its requests account for {accounted} blocks but only {held} are held")
    return problems


def _check_records(
    requests: Sequence[RequestRecord], live: Mapping[str, WorkerRecord], reachable: Mapping[str, WorkerReport]
) -> list[str]:
    """Each record against the workers it names. Unreachable workers were reported already."""
    held = {wid: set(report.request_ids) for wid, report in reachable.items()}
    problems = []
    for rec in sorted(requests, key=lambda r: r.request_id):
        where = f"request {rec.request_id} ({rec.state.value})"
        if rec.owner not in live:
            problems.append(f"{where}: owner {rec.owner} is not a live worker")
        if rec.decode_worker != rec.owner and rec.decode_worker not in live:
            problems.append(f"{where}: decode worker {rec.decode_worker} is not a live worker")
        # D holds the request's blocks in every state, from reserve to end.
        if rec.decode_worker in held and rec.request_id not in held[rec.decode_worker]:
            problems.append(f"{where}: decode worker {rec.decode_worker} does not report it")
        # Only while it owns the request: after the handoff P may already have let go.
        if (
            rec.state is RequestState.PREFILLING
            and rec.owner in held
            and rec.request_id not in held[rec.owner]
        ):
            problems.append(f"{where}: prefill worker {rec.owner} does not report it")
    return problems


def _check_reported(requests: Sequence[RequestRecord], reachable: Mapping[str, WorkerReport]) -> list[str]:
    """Each request a worker reports must have a record that names the worker."""
    records = {r.request_id: r for r in requests}
    problems = []
    for wid in sorted(reachable):
        for rid in sorted(set(reachable[wid].request_ids)):
            rec = records.get(rid)
            if rec is None:
                problems.append(f"worker {wid}: reports request {rid}, which has no record")
            elif not _names(rec, wid):
                problems.append(
                    f"worker {wid}: reports request {rid}, whose record names owner {rec.owner},"
                    f" decode worker {rec.decode_worker}, prefill worker {rec.prefill_worker or '(none)'}"
                )
    return problems


def _names(rec: RequestRecord, wid: str) -> bool:
    """True if the record accounts for `wid` working on it (P between the handoff and its release too)."""
    if wid in (rec.owner, rec.decode_worker):
        return True
    return wid == rec.prefill_worker and rec.state is RequestState.DECODING
