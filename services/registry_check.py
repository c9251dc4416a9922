"""`baton registry check`: compare the registry with every live worker's own allocator.

Exit 0 when they agree and nothing leaked; otherwise print each problem and exit 1. Snapshots of
Redis and of the workers are not taken atomically, so a problem seen once is checked again after a
pause and reported only if it persists.

`check_idle` is the stricter check once no request should be in flight any more (I3: the end of a
lifecycle test, of a soak): the audit is clean, no request record is left, and no worker holds a block
or reports a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from baton.shared.config import RegistryConfig
from baton.shared.grpc_server import open_channel
from baton.shared.grpc_tls import GrpcTls
from baton.shared.registry import Registry, WorkerRecord, WorkerReport, audit, redacted
from baton.shared.rpc import worker_pb2, worker_pb2_grpc

RECHECK_DELAY_S = 1.0
STATS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class AuditResult:
    num_workers: int
    num_requests: int
    problems: list[str]
    """What the audit found wrong; [] means clean."""
    reports: dict[str, WorkerReport | str] = field(default_factory=dict)
    """Each live worker's report, or why it could not be reached."""
    request_ids: tuple[str, ...] = ()
    """The live request records' ids."""


async def audit_once(registry: Registry, tls: GrpcTls | None = None) -> AuditResult:
    workers = await registry.live_workers()
    requests = await registry.live_requests()
    reports = dict(await asyncio.gather(*(_report(w, tls) for w in workers)))
    problems = audit(workers, requests, reports)
    return AuditResult(len(workers), len(requests), problems, reports, tuple(r.request_id for r in requests))


async def check(registry: Registry, tls: GrpcTls | None = None) -> AuditResult:
    """Audit the registry against every live worker (asked over gRPC, TLS when `tls`); a problem
    counts only if a second audit a moment later sees it too."""
    first = await audit_once(registry, tls)
    if not first.problems:
        return first
    await asyncio.sleep(RECHECK_DELAY_S)
    second = await audit_once(registry, tls)
    persistent = [p for p in second.problems if p in first.problems]
    return AuditResult(
        second.num_workers, second.num_requests, persistent, second.reports, second.request_ids
    )


@dataclass(frozen=True)
class IdleResult:
    """The cluster once every request has ended: the audit, and whatever is still held."""

    audit: AuditResult
    held_blocks: dict[str, int]
    """Blocks each worker still holds (workers holding none are left out)."""
    worker_requests: dict[str, tuple[str, ...]]
    """Requests each worker still reports (workers reporting none are left out)."""

    @property
    def leaked_blocks(self) -> int:
        """Blocks still held, summed over the workers: a leak once nothing is in flight."""
        return sum(self.held_blocks.values())

    @property
    def problems(self) -> list[str]:
        """The audit's problems, then every record, block and request left over; [] means clean."""
        problems = list(self.audit.problems)
        if self.audit.request_ids:
            problems.append(f"the registry still holds request records {list(self.audit.request_ids)}")
        problems += [f"worker {w} still holds {n} blocks" for w, n in sorted(self.held_blocks.items())]
        for worker, ids in sorted(self.worker_requests.items()):
            problems.append(f"worker {worker} still reports requests {list(ids)}")
        return problems


async def idle_once(registry: Registry, tls: GrpcTls | None = None) -> IdleResult:
    result = await audit_once(registry, tls)
    reports = [r for r in result.reports.values() if isinstance(r, WorkerReport)]
    return IdleResult(
        result,
        {r.worker_id: r.num_held_blocks for r in reports if r.num_held_blocks},
        {r.worker_id: r.request_ids for r in reports if r.request_ids},
    )


async def check_idle(
    registry: Registry, timeout_s: float, poll_s: float = 0.3, tls: GrpcTls | None = None
) -> IdleResult:
    """I3 once the load has stopped: audit again and again until the registry and every worker are
    clean of requests, or `timeout_s` passed (aborts and expiring records take a moment to land).
    Returns the last look."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await idle_once(registry, tls)
        if not result.problems or asyncio.get_running_loop().time() >= deadline:
            return result
        await asyncio.sleep(poll_s)


async def _report(worker: WorkerRecord, tls: GrpcTls | None) -> tuple[str, WorkerReport | str]:
    wid = worker.info.worker_id
    channel = open_channel(worker.info.grpc_address, tls)
    try:
        stub: worker_pb2_grpc.DecodeWorkerStub | worker_pb2_grpc.PrefillWorkerStub
        if worker.info.role == "decode":
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        else:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        stats = await stub.GetStats(worker_pb2.GetStatsRequest(check_integrity=True), timeout=STATS_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return wid, f"unreachable at {worker.info.grpc_address}: {exc.code().name} {exc.details()}"
    finally:
        await channel.close()
    return wid, WorkerReport(
        worker_id=stats.worker_id,
        role=stats.role,
        request_ids=tuple(stats.request_ids),
        integrity_error=stats.integrity_error or None,
        num_held_blocks=stats.num_held_blocks,
        num_request_blocks=stats.num_request_blocks,
    )


async def run_check(config: RegistryConfig, tls: GrpcTls | None = None) -> int:
    async with Registry.from_config(config) as registry:
        result = await check(registry, tls)
    where = f"registry {redacted(config.redis_url)} (namespace {config.namespace!r})"
    if result.problems:
        print(f"{where}: {len(result.problems)} problem(s) with {result.num_workers} live workers:")
        for problem in result.problems:
            print(f"  - {problem}")
        return 1
    print(
        f"{where}: clean ({result.num_workers} live workers agree with it, "
        f"{result.num_requests} live requests)"
    )
    return 0
