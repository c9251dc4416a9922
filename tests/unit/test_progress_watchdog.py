"""Liveness from forward progress: AsyncEngine.stalled_for measures a stuck step, and the watchdog
turns a real gRPC server's health NOT_SERVING while the engine is stuck or dead."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton import SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.grpc_server import start_server
from baton.shared.progress_watchdog import ProgressWatchdog

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def hanging_engine(llama_dir: Path) -> tuple[AsyncEngine, threading.Event, threading.Event]:
    """An engine whose first step hangs (as on a hung device) until `release` is set; `entered` is
    set once it hangs."""
    engine = AsyncEngine.from_config(EngineConfig(model=str(llama_dir)))
    step, entered, release = engine.core.step, threading.Event(), threading.Event()

    def stuck_step() -> list:
        entered.set()
        release.wait(30)
        return step()

    engine.core.step = stuck_step  # type: ignore[method-assign]
    return engine, entered, release


def test_stalled_for_grows_while_a_step_hangs_and_is_infinite_when_not_running(llama_dir: Path) -> None:
    async def main() -> None:
        engine, entered, release = hanging_engine(llama_dir)
        assert engine.stalled_for() == math.inf  # not started
        engine.start()
        assert engine.stalled_for() == 0.0  # idle is not stalled
        outputs = engine.generate([1, 2, 3], GREEDY)
        first = asyncio.ensure_future(anext(outputs))
        await asyncio.to_thread(entered.wait, 10)
        await asyncio.sleep(0.3)
        assert engine.stalled_for() >= 0.3
        release.set()
        await first
        async for _ in outputs:
            pass
        assert engine.stalled_for() == 0.0
        engine.shutdown()
        assert engine.stalled_for() == math.inf

    asyncio.run(main())


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


def test_health_follows_the_engines_progress_and_leaves_a_drain_alone(llama_dir: Path) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def main() -> None:
        engine, entered, release = hanging_engine(llama_dir)
        engine.start()
        server = await start_server([], "127.0.0.1", 0)
        address = f"127.0.0.1:{server.port}"
        draining = False
        watchdog = ProgressWatchdog(engine, server, stall_timeout_s=0.2, draining=lambda: draining)
        watchdog.start()
        try:
            assert await _health(address) == serving
            outputs = engine.generate([1, 2, 3], GREEDY)
            first = asyncio.ensure_future(anext(outputs))
            await asyncio.to_thread(entered.wait, 10)
            deadline = time.monotonic() + 5
            while await _health(address) == serving and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await _health(address) == not_serving  # the socket listens, the engine is stuck
            release.set()
            await first
            async for _ in outputs:
                pass
            await watchdog.check()
            assert await _health(address) == serving  # progressing again
            draining = True
            await server.set_serving(False)  # a drain turned it NOT_SERVING: it stays so
            engine.shutdown()  # not running: stalled for ever
            await watchdog.check()
            assert not watchdog.healthy and await _health(address) == not_serving
            draining = False
            watchdog.healthy = True
            await server.set_serving(True)
            await watchdog.check()  # a dead engine, no drain: NOT_SERVING
            assert await _health(address) == not_serving
        finally:
            await watchdog.stop()
            await server.server.stop(None)
            release.set()
            engine.shutdown()

    asyncio.run(main())
