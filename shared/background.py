"""Tasks started and not awaited by their starter: asyncio keeps only a weak reference to a running
task, so whoever spawns one must hold it until it is done, and usually wait for the rest at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class BackgroundTasks:
    """A set of tasks, each held until it finishes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task on the running loop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until every task started so far finished (or `timeout_s` passed); never raises their errors."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
