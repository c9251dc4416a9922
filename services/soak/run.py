"""Drives a soak: starts a local cluster (its own Redis, free ports), runs client lanes against its
gateway until the duration is up while workers are killed (SIGKILL) and restarted on a schedule,
lets the cluster settle, checks that nothing is held anywhere (`check_idle`: the registry audit,
no request record left, no block held by any worker), stops the cluster and reports."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from baton.services.launcher import ClusterSpec, LocalCluster
from baton.services.registry_check import IdleResult, check_idle
from baton.services.soak.client import http_client, send
from baton.services.soak.memory import MemoryTrack
from baton.services.soak.outcome import classify
from baton.services.soak.report import Restart, Tally, build_report
from baton.services.soak.workload import Workload, WorkloadConfig

ROLES = ("decode", "prefill")
RESTART_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class SoakConfig:
    model: str
    num_prefill: int = 2
    num_decode: int = 2
    duration_s: float = 180.0
    """How long new requests are sent; those in flight then run to their end."""
    concurrency: int = 8
    """Client lanes, each sending its next request when the previous one ended."""
    seed: int = 0
    kill: tuple[str, ...] = ROLES
    """Roles whose first worker (decode-0, prefill-0) is killed and restarted, one after the other,
    spread evenly over the run (one role: at the middle)."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request_timeout_s: float = 120.0
    """A request with no complete answer by then is lost (a hang)."""
    settle_timeout_s: float = 60.0
    """After the load, how long the cluster gets to be clean of requests (records of a killed
    worker last up to 3 leases)."""
    lease_ttl_s: float = 3.0
    progress_interval_s: float = 10.0
    cluster_log: Path | None = None
    """Where the cluster's processes log (default: a new file in the temporary directory)."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.concurrency < 1 or self.request_timeout_s <= 0:
            raise ValueError("--duration-s and --request-timeout-s must be > 0, --concurrency >= 1")
        if not self.kill:
            raise ValueError("a soak restarts at least one worker: --kill decode, prefill or both")
        if unknown := set(self.kill) - set(ROLES):
            raise ValueError(f"--kill: unknown roles {sorted(unknown)}; known: {', '.join(ROLES)}")
        if self.num_decode < 1 or ("prefill" in self.kill and self.num_prefill < 1):
            raise ValueError("the cluster needs a decode worker, and a prefill worker to kill one")

    @property
    def victims(self) -> list[str]:
        return [f"{role}-0" for role in self.kill]


def run_soak(config: SoakConfig, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the soak; returns the report (see `report.build_report`)."""
    log_path = config.cluster_log or _new_log_file()
    print(f"soak: starting the cluster (its logs: {log_path})", file=out, flush=True)
    began = time.monotonic()
    with open(log_path, "w") as log:
        cluster = LocalCluster(_cluster_spec(config), log=log)
        cluster.start()
        started = time.monotonic()
        try:
            memory = MemoryTrack()
            tally, restarts, drain_s = asyncio.run(_load(cluster, config, out, memory))
            print("soak: load stopped; waiting for the cluster to be idle, auditing it", file=out, flush=True)
            load_ended = time.monotonic()
            idle = asyncio.run(_settle(cluster, config.settle_timeout_s))
            settle_s = time.monotonic() - load_ended
            unexpected_exits = cluster.exited()
        finally:
            cluster.stop()
    durations = {
        "startup": started - began,
        "load": config.duration_s,
        "drain": drain_s,
        "settle": settle_s,
        "total": time.monotonic() - began,
    }
    described = _described(config, log_path)
    return build_report(tally, restarts, idle, unexpected_exits, durations, described, memory.report())


def _new_log_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="baton-soak-", suffix=".log")
    os.close(fd)
    return Path(name)


def _cluster_spec(config: SoakConfig) -> ClusterSpec:
    return ClusterSpec(
        model=config.model,
        num_prefill=config.num_prefill,
        num_decode=config.num_decode,
        router_port=0,
        http_port=0,
        lease_ttl_s=config.lease_ttl_s,
        namespace="baton-soak",
    )


async def _load(
    cluster: LocalCluster, config: SoakConfig, out: TextIO, memory: MemoryTrack
) -> tuple[Tally, list[Restart], float]:
    """Client lanes until the duration is up, the kills and restarts beside them, every process's
    memory sampled each second; returns the tally, the restarts and how long the requests in flight at
    the end took to finish."""
    tally, workload = Tally(), Workload(config.workload, config.seed)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + config.duration_s
    async with http_client(cluster.gateway_url, config.request_timeout_s) as client:
        lanes = [
            asyncio.create_task(
                _lane(client, workload, random.Random(f"{config.seed}:{i}"), stop_at, tally, config)
            )
            for i in range(config.concurrency)
        ]
        faults = asyncio.create_task(_kill_and_restart(cluster, config, started, out))
        progress = asyncio.create_task(_progress(tally, started, config, out))
        sampling = asyncio.create_task(_sample_memory(cluster, memory))
        try:
            await asyncio.gather(*lanes)
            drain_s = loop.time() - stop_at
            restarts = await faults
        finally:
            progress.cancel()
            sampling.cancel()
    memory.sample(cluster.processes)
    print(tally.progress_line(loop.time() - started, config.duration_s), file=out, flush=True)
    return tally, restarts, max(0.0, drain_s)


async def _lane(
    client: httpx.AsyncClient,
    workload: Workload,
    rng: random.Random,
    stop_at: float,
    tally: Tally,
    config: SoakConfig,
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        request = workload.next(rng)
        tally.started(request)
        seen = await send(client, request, config.request_timeout_s)
        tally.ended(request, classify(seen), seen.body)


async def _kill_and_restart(
    cluster: LocalCluster, config: SoakConfig, started: float, out: TextIO
) -> list[Restart]:
    """Each victim in turn: SIGKILL at its moment, then the same command again, until it serves."""
    loop = asyncio.get_running_loop()
    restarts = []
    victims = config.victims
    for i, victim in enumerate(victims):
        await asyncio.sleep(
            max(0.0, started + config.duration_s * (i + 1) / (len(victims) + 1) - loop.time())
        )
        killed_at = loop.time()
        await asyncio.to_thread(cluster.kill, victim)
        print(
            f"soak: killed {victim} (SIGKILL) at {killed_at - started:.0f} s; restarting it",
            file=out,
            flush=True,
        )
        try:
            await asyncio.to_thread(cluster.restart, victim, RESTART_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            restarts.append(Restart(victim, killed_at - started, None, str(exc)))
            print(f"soak: {victim} did not come back: {exc}", file=out, flush=True)
            break
        restarts.append(Restart(victim, killed_at - started, loop.time() - killed_at))
        print(
            f"soak: {victim} serves again, {loop.time() - killed_at:.1f} s after the kill",
            file=out,
            flush=True,
        )
    return restarts


async def _sample_memory(cluster: LocalCluster, memory: MemoryTrack, interval_s: float = 1.0) -> None:
    while True:
        memory.sample(cluster.processes)
        await asyncio.sleep(interval_s)


async def _progress(tally: Tally, started: float, config: SoakConfig, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.progress_interval_s)
        print(tally.progress_line(loop.time() - started, config.duration_s), file=out, flush=True)


async def _settle(cluster: LocalCluster, timeout_s: float) -> IdleResult:
    async with cluster.registry() as registry:
        return await check_idle(registry, timeout_s)


def _described(config: SoakConfig, log_path: Path) -> dict[str, Any]:
    described = asdict(config)
    described["cluster_log"] = str(log_path)
    described["kill"] = list(config.kill)
    return described
