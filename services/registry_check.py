"""`baton registry check`: compare the registry with every live worker's own allocator.

Exit 0 when they agree and nothing leaked; otherwise print each problem and exit 1. Snapshots of
Redis and of the workers are not taken atomically, so a problem seen once is checked again after a
pause and reported only if it persists."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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


async def audit_once(registry: Registry, tls: GrpcTls | None = None) -> AuditResult:
    workers = await registry.live_workers()
    requests = await registry.live_requests()
    reports = dict(await asyncio.gather(*(_report(w, tls) for w in workers)))
    return AuditResult(len(workers), len(requests), audit(workers, requests, reports))


async def check(registry: Registry, tls: GrpcTls | None = None) -> AuditResult:
    """Audit the registry against every live worker (asked over gRPC, TLS when `tls`); a problem
    counts only if a second audit a moment later sees it too."""
    first = await audit_once(registry, tls)
    if not first.problems:
        return first
    await asyncio.sleep(RECHECK_DELAY_S)
    second = await audit_once(registry, tls)
    persistent = [p for p in second.problems if p in first.problems]
    return AuditResult(second.num_workers, second.num_requests, persistent)


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
