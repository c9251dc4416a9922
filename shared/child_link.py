"""A worker's helper process and the pipe between them: the worker spawns the child with its end of
a pipe, both ends exchange pickled tuples (CUDA tensors and interprocess events travel as IPC handles
through torch.multiprocessing), and each end reads the other's messages on its event loop.

The child's first message is ("ready", *values) or ("start_failed", error)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing

logger = logging.getLogger(__name__)

Message = tuple[Any, ...]


class ChildLink:
    """The worker's end: starts the child and speaks to it from the worker's event loop."""

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: tuple[Any, ...],
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
    ) -> None:
        """`target(conn, *args)` runs in the spawned child. `on_message` gets every message after
        "ready"; `on_lost` runs once if the child goes away after starting, other than by close()."""
        self.name = name
        self._target, self._args = target, args
        self._on_message, self._on_lost = on_message, on_lost
        self._conn: Connection | None = None
        self._process: Any = None
        self._started: asyncio.Future[tuple[Any, ...]] | None = None
        self._closing = False

    @property
    def alive(self) -> bool:
        return self._conn is not None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self, timeout_s: float) -> tuple[Any, ...]:
        """Spawn the child; returns the values of its "ready" message."""
        ctx = torch.multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(target=self._target, args=(child_end, *self._args), name=self.name, daemon=True)
        process.start()  # from the loop's thread, which lives as long as the worker (a child may tie its
        # life to the thread that started it: see services.lifecycle.terminate_with_parent)
        child_end.close()
        self._process, self._conn = process, parent_end
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        loop.add_reader(parent_end.fileno(), self._on_readable)
        try:
            return await asyncio.wait_for(asyncio.shield(self._started), timeout_s)
        except BaseException:
            await self.close()
            raise

    def send(self, msg: Message) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(OSError, ValueError):  # the child is gone: the reader reports it
            self._conn.send(msg)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to stop (("stop",)) and wait for it; kill it if it does not."""
        self._closing = True
        self.send(("stop",))
        if self._process is not None:
            process, self._process = self._process, None
            await asyncio.to_thread(process.join, timeout_s)
            if process.is_alive():
                logger.warning("%s did not stop within %g s: killing it", self.name, timeout_s)
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
        self._disconnect()

    def _on_readable(self) -> None:
        conn = self._conn
        try:
            while conn is not None and conn.poll():
                msg = conn.recv()
                started = self._started
                if started is not None and not started.done():
                    if msg[0] == "ready":
                        started.set_result(msg[1:])
                    elif msg[0] == "start_failed":
                        started.set_exception(RuntimeError(f"{self.name} failed to start: {msg[1]}"))
                    continue
                self._on_message(msg)
                conn = self._conn  # a handler may have closed it
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        closing = self._closing
        self._disconnect()
        if self._started is not None and not self._started.done():
            self._started.set_exception(RuntimeError(f"{self.name} exited while starting"))
        elif not closing:
            self._on_lost()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()


class ParentLink:
    """The child's end: reads the worker's messages on the child's event loop."""

    def __init__(self, conn: Connection, on_message: Callable[[Message], None]) -> None:
        """`on_message` gets every message but ("stop",), which (like the worker going away) sets
        `stopped`."""
        self._conn = conn
        self._on_message = on_message
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def listen(self) -> None:
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._on_readable)

    def send(self, msg: Message) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError):
            self.stop()

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                if msg[0] == "stop":
                    self.stop()
                else:
                    self._on_message(msg)
        except (EOFError, OSError):
            self.stop()  # the worker is gone
