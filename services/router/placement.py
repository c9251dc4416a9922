"""Where a request goes: pure ranking of live workers (no I/O, unit-tested directly).

Decode worker: the least loaded (router's own in-flight count plus its reported running and waiting
requests), then the most free blocks. Prefill worker: the longest cached prefix of the prompt (Redis
prefix index), then the least loaded. A prompt whose uncached part is short is prefilled by the decode
worker itself: shipping its KV would cost more than computing it there (conditional disaggregation);
so is any prompt while every prefill worker's queue is full (`--max-prefill-queue-tokens`), rather
than waiting behind it while the decode GPU has time to spare.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from baton.shared.registry import WorkerRecord


@dataclass
class QueuedPrefill:
    """A prompt's uncached tokens in a prefill worker's queue, as this router counts it: from its
    placement until its Prefill call returns (computed and handed off) or its attempt ends."""

    queue: Counter[str]
    worker_id: str
    num_tokens: int
    released: bool = False

    @classmethod
    def join(cls, queue: Counter[str], worker_id: str, num_tokens: int) -> QueuedPrefill:
        queue[worker_id] += num_tokens
        return cls(queue, worker_id, num_tokens)

    def release(self) -> None:
        """Leave the queue (again: nothing)."""
        if not self.released:
            self.released = True
            self.queue[self.worker_id] -= self.num_tokens


@dataclass(frozen=True)
class Placement:
    decode: WorkerRecord
    prefill: WorkerRecord | None
    """None: the decode worker prefills the prompt itself."""
    num_cached_tokens: int
    """Prompt tokens the chosen prefill worker has in its prefix cache (by the index)."""
    queued: QueuedPrefill | None = None
    """Its place in the prefill worker's queue (None for a local prefill)."""


def load_of(worker: WorkerRecord, in_flight: Mapping[str, int]) -> int:
    return in_flight.get(worker.info.worker_id, 0) + worker.load.num_running + worker.load.num_waiting


def rank_decode_workers(
    workers: Sequence[WorkerRecord], in_flight: Mapping[str, int], exclude: Collection[str] = ()
) -> list[WorkerRecord]:
    """Candidates best first."""
    candidates = [w for w in workers if w.info.worker_id not in exclude]
    return sorted(
        candidates, key=lambda w: (load_of(w, in_flight), -w.load.num_free_blocks, w.info.worker_id)
    )


def choose_prefill_worker(
    workers: Sequence[WorkerRecord],
    overlap_blocks: Mapping[str, int],
    in_flight: Mapping[str, int],
    exclude: Collection[str] = (),
) -> WorkerRecord | None:
    """The worker with the longest cached prefix, then the least loaded; None if there is none."""
    candidates = [w for w in workers if w.info.worker_id not in exclude]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda w: (-overlap_blocks.get(w.info.worker_id, 0), load_of(w, in_flight), w.info.worker_id),
    )


def with_queue_room(
    workers: Sequence[WorkerRecord], queued_tokens: Mapping[str, int], max_queue_tokens: int
) -> list[WorkerRecord]:
    """The prefill workers with fewer than `max_queue_tokens` prompt tokens queued (0: no limit)."""
    if max_queue_tokens <= 0:
        return list(workers)
    return [w for w in workers if queued_tokens.get(w.info.worker_id, 0) < max_queue_tokens]


def prefill_locally(num_prompt_tokens: int, num_cached_tokens: int, local_prefill_max_tokens: int) -> bool:
    """Conditional disaggregation: a short uncached remainder is cheaper to compute than to ship."""
    return num_prompt_tokens - num_cached_tokens <= local_prefill_max_tokens
