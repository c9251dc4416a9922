"""Where a request goes: pure ranking of live workers (no I/O, unit-tested directly).

Decode worker: the least loaded (router's own in-flight count plus its reported running and waiting
requests), then the most free blocks. Prefill worker: the longest cached prefix of the prompt (Redis
prefix index), then the least loaded. A prompt whose uncached part is short is prefilled by the decode
worker itself: shipping its KV would cost more than computing it there (conditional disaggregation).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from baton.shared.registry import WorkerRecord


@dataclass(frozen=True)
class Placement:
    decode: WorkerRecord
    prefill: WorkerRecord | None
    """None: the decode worker prefills the prompt itself."""
    num_cached_tokens: int
    """Prompt tokens the chosen prefill worker has in its prefix cache (by the index)."""


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


def prefill_locally(num_prompt_tokens: int, num_cached_tokens: int, local_prefill_max_tokens: int) -> bool:
    """Conditional disaggregation: a short uncached remainder is cheaper to compute than to ship."""
    return num_prompt_tokens - num_cached_tokens <= local_prefill_max_tokens
