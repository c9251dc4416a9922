"""Pieces both worker services share: identity (model fingerprint, KV layout), the engine's state as
registry snapshots and WorkerStats, and the gRPC + registry plumbing around an AsyncEngine."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore, EngineStats
from baton.shared.registry import RequestRecord, RequestState, WorkerLoad
from baton.shared.rpc import worker_pb2
from baton.shared.transfer import KVLayout
from baton.shared.worker_presence import PresenceSnapshot


def model_fingerprint(model_dir: Path, dtype_name: str) -> str:
    """Identity of the served weights: config.json's bytes, the weight files' names and sizes, the dtype.
    Two workers push KV to each other only if these agree."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update(dtype_name.encode())
    return f"{model_dir.name}-{digest.hexdigest()}"


def dtype_name(core: EngineCore) -> str:
    return str(core.dtype).removeprefix("torch.")


def kv_layout(core: EngineCore) -> KVLayout:
    mc = core.model_config
    return KVLayout(
        model_id=model_fingerprint(core.model_dir, dtype_name(core)),
        num_layers=mc.num_layers,
        block_size=core.config.block_size,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        dtype=dtype_name(core),
    )


def track_cache_events(core: EngineCore) -> None:
    """Start recording the prefix cache's changes, which presence publishes to the registry's index."""
    core.kv_manager.pool.track_cache_events()


def step_summary(core: EngineCore) -> str:
    """Where the engine's step time went, in one line (logged when a worker stops)."""
    return core.step_stats.summary()


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def snapshot_of(
    core: EngineCore, extra_request_ids: Iterable[str], full: bool, records: list[RequestRecord]
) -> PresenceSnapshot:
    """Run on the engine thread (AsyncEngine.call): load, held requests, prefix-cache changes."""
    stats = core.stats()
    pool = core.kv_manager.pool
    added, removed = pool.drain_cache_events()
    return PresenceSnapshot(
        load=WorkerLoad(
            num_free_blocks=stats.num_free_blocks + stats.num_cached_blocks,
            num_running=stats.num_running + stats.num_reserved,
            num_waiting=stats.num_waiting,
        ),
        request_ids=sorted({*stats.request_ids, *extra_request_ids}),
        prefix_added=[h.hex() for h in added],
        prefix_removed=[h.hex() for h in removed],
        prefix_all=[h.hex() for h in pool.cached_hashes] if full else None,
        records=records if full else [],
    )


@dataclass(frozen=True)
class EngineState:
    """What GetStats reads on the engine's side (plain values: it may come from another process)."""

    stats: EngineStats
    num_blocks: int
    integrity_error: str


def engine_state(core: EngineCore, check_integrity: bool) -> EngineState:
    """Run on the engine thread (AsyncEngine.call): the allocator's and scheduler's counters, and
    the integrity check's verdict if asked for ("" when it passed or did not run)."""
    integrity_error = ""
    if check_integrity:
        try:
            core.check_integrity()
        except AssertionError as exc:
            integrity_error = str(exc)
    return EngineState(core.stats(), core.kv_manager.pool.num_blocks, integrity_error)


async def worker_stats(
    engine: AsyncEngine, worker_id: str, role: str, extra_request_ids: Iterable[str], check_integrity: bool
) -> worker_pb2.WorkerStats:
    """The engine's counters as a WorkerStats message."""
    state = await engine.call(engine_state, check_integrity)
    stats = state.stats
    return worker_pb2.WorkerStats(
        worker_id=worker_id,
        role=role,
        num_blocks=state.num_blocks,
        num_free_blocks=stats.num_free_blocks,
        num_cached_blocks=stats.num_cached_blocks,
        num_held_blocks=stats.num_held_blocks,
        num_request_blocks=stats.num_request_blocks,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_reserved=stats.num_reserved,
        num_preemptions=stats.num_preemptions,
        prefix_query_tokens=stats.prefix_query_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        request_ids=sorted({*stats.request_ids, *extra_request_ids}),
        integrity_error=state.integrity_error,
    )


async def engine_snapshot(
    engine: AsyncEngine, extra_request_ids: Iterable[str], full: bool, records: list[RequestRecord]
) -> PresenceSnapshot:
    extra = list(extra_request_ids)
    return await engine.call(snapshot_of, extra, full, records)


def request_record(
    request_id: str, state: RequestState, owner: str, decode_worker: str, prefill_worker: str, num_blocks: int
) -> RequestRecord:
    """A record as its holder knows it (to restore it after Redis lost it; times are 'now')."""
    now = time.time()
    return RequestRecord(request_id, state, owner, decode_worker, prefill_worker, num_blocks, now, now)


@dataclass
class TransferCounters:
    """A worker's KV push counters since start (prefill: sent; decode: received and committed)."""

    num_transfers: int = 0
    num_transfer_failures: int = 0
    transfer_bytes: int = 0
    num_finished: int = 0


async def stats_reply(
    engine: AsyncEngine,
    worker_id: str,
    role: str,
    request_ids: Iterable[str],
    check_integrity: bool,
    counters: TransferCounters,
) -> worker_pb2.WorkerStats:
    """The GetStats answer: the engine's state (read on its thread) plus the service's counters."""
    ids = list(request_ids)
    stats = await worker_stats(engine, worker_id, role, ids, check_integrity)
    stats.num_transfers = counters.num_transfers
    stats.num_transfer_failures = counters.num_transfer_failures
    stats.transfer_bytes = counters.transfer_bytes
    stats.num_finished = counters.num_finished
    return stats
