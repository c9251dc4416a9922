"""Placement ranks live workers without I/O: exact choices for given loads and prefix overlaps."""

from __future__ import annotations

from collections import Counter

from baton.services.router.placement import (
    QueuedPrefill,
    choose_prefill_worker,
    prefill_locally,
    rank_decode_workers,
    with_queue_room,
)
from baton.shared.registry import WorkerInfo, WorkerLoad, WorkerRecord


def worker(worker_id: str, role: str, free: int = 100, running: int = 0, waiting: int = 0) -> WorkerRecord:
    info = WorkerInfo(worker_id, role, f"{worker_id}:1", "", "m", 16, 128)
    return WorkerRecord(info, WorkerLoad(free, running, waiting), 0.0)


def test_decode_workers_rank_by_load_then_free_blocks() -> None:
    a, b, c = worker("a", "decode", 50, 2), worker("b", "decode", 80, 2), worker("c", "decode", 10, 0)
    assert [w.info.worker_id for w in rank_decode_workers([a, b, c], {})] == ["c", "b", "a"]
    assert [w.info.worker_id for w in rank_decode_workers([a, b, c], {"c": 5})] == ["b", "a", "c"]
    assert [w.info.worker_id for w in rank_decode_workers([a, b, c], {}, exclude={"c"})] == ["b", "a"]


def test_prefill_worker_with_the_longest_cached_prefix_wins_then_load() -> None:
    p, q = worker("p", "prefill", running=3), worker("q", "prefill")
    assert choose_prefill_worker([p, q], {"p": 4, "q": 1}, {}).info.worker_id == "p"
    assert choose_prefill_worker([p, q], {}, {}).info.worker_id == "q"
    assert choose_prefill_worker([p, q], {"p": 4}, {}, exclude={"p"}).info.worker_id == "q"
    assert choose_prefill_worker([p], {}, {}, exclude={"p"}) is None


def test_short_uncached_remainders_are_prefilled_locally() -> None:
    assert prefill_locally(60, 0, 64)
    assert not prefill_locally(200, 0, 64)
    assert prefill_locally(200, 160, 64)
    assert not prefill_locally(1, 0, 0)


def test_prefill_workers_with_a_full_queue_are_passed_over() -> None:
    p, q = worker("p", "prefill"), worker("q", "prefill")
    queued = {"p": 4096, "q": 4095}
    assert [w.info.worker_id for w in with_queue_room([p, q], queued, 4096)] == ["q"]
    assert with_queue_room([p, q], {"p": 4096, "q": 5000}, 4096) == []
    assert with_queue_room([p, q], {"p": 10**9, "q": 10**9}, 0) == [p, q]  # 0: no limit


def test_a_queued_prefill_leaves_its_queue_once() -> None:
    queue: Counter[str] = Counter()
    first = QueuedPrefill.join(queue, "p", 1000)
    second = QueuedPrefill.join(queue, "p", 24)
    assert queue["p"] == 1024
    first.release()
    first.release()  # the prefill call's end and the attempt's end both release it
    assert queue["p"] == 24
    second.release()
    assert queue["p"] == 0
