"""Liveness from forward progress: a worker's gRPC health follows its engine, not just its socket.
A listening server whose engine is stuck (a hung device, a deadlock, a dead engine thread) reports
NOT_SERVING, so an orchestrator's liveness probe restarts it and the router stops placing on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)


class Progressing(Protocol):
    def stalled_for(self) -> float:
        """Seconds without progress (see AsyncEngine.stalled_for)."""


class HealthStatus(Protocol):
    async def set_serving(self, serving: bool) -> None: ...


class ProgressWatchdog:
    """Polls `engine.stalled_for()`; past `stall_timeout_s` turns `health` NOT_SERVING, and SERVING
    again once the engine progresses, unless `draining()` (a drain owns the status then)."""

    def __init__(
        self,
        engine: Progressing,
        health: HealthStatus,
        stall_timeout_s: float,
        draining: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self.health = health
        self.stall_timeout_s = stall_timeout_s
        self.draining = draining
        self.healthy = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def check(self) -> None:
        """One look at the engine; flips the health status when it changed."""
        stalled = self.engine.stalled_for()
        healthy = stalled <= self.stall_timeout_s
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            logger.warning("the engine is making progress again: health SERVING")
        else:
            logger.error(
                "the engine has made no progress for %s (a stuck step or a dead engine thread): "
                "health NOT_SERVING",
                f"{stalled:.0f} s" if stalled != float("inf") else "ever: it is not running",
            )
        if not self.draining():
            await self.health.set_serving(healthy)

    async def _watch(self) -> None:
        interval = min(1.0, self.stall_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            await self.check()
