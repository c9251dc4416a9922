"""The engine core in a process of its own (vLLM V1's layout).

In a worker whose engine runs on a thread, the step loop shares the GIL with the worker's event loop
(gRPC, the registry, output streams): measured on H200s, that loop held the GIL 20-30 % of the time
beside a host-bound step loop (benchmarks/NOTES.md). `ProcessEngine` keeps the callers' side of
`AsyncEngine` (streams, validation, reservations' release) in the worker and runs the step loop, with
the model and the KV cache, in a spawned child; only pickled commands and each step's outputs cross.

Messages over the pipe:
    worker -> child: the AsyncEngine commands (_Add, _Abort, _Commit, _Fail, _Release, _Call with its
                     number) | ("stop",)
    child -> worker: ("ready", info) | ("start_failed", error) | ("out", outputs) | ("error", request_id,
                     exception) | ("reply", number, ok, value) | ("dead", message)

A call's function and arguments must pickle: a module-level function or an EngineCore method.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing

from baton.services.lifecycle import terminate_with_parent
from baton.shared.child_link import ChildLink, Message
from baton.shared.config import EngineConfig
from baton.shared.engine.async_engine import _STOP, AsyncEngine, EngineDeadError, _Call
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache import SharedKVCaches
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.request_validator import RequestValidator
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.worker_runtime import kv_layout

logger = logging.getLogger(__name__)


class ProcessEngine(AsyncEngine):
    """An AsyncEngine whose core steps in a child process. Use as `async with
    ProcessEngine(config) as engine:`, or `await start_process()` and `await aclose()`."""

    _stopped: bool
    _fence_as_handle = True  # a reservation's fence crosses the worker as bytes, opened by its writer

    def __init__(
        self, config: EngineConfig, log_format: str = "%(message)s", threads: int | None = None
    ) -> None:
        """`threads`: the child's torch CPU threads (None: torch's default)."""
        self._init_frontend(config)
        self.validator = RequestValidator.from_config(config)  # no model loaded on this side
        self._log_format = log_format
        self._threads = threads
        self._link: ChildLink | None = None
        self._send_lock = threading.Lock()  # commands come from any thread
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._busy: Any = None  # a shared double: when the child's step in progress began (0: none)
        self.info: dict[str, Any] = {}
        """What the child reported once its engine was built (see engine_info)."""
        self.on_lost: Callable[[], None] | None = None
        """Called (on the event loop) if the child dies while this engine runs."""

    @classmethod
    def from_config(cls, config: EngineConfig) -> ProcessEngine:
        return cls(config)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start_process(self, timeout_s: float = 600.0) -> None:
        """Spawn the child and wait until its engine is built (the model loaded)."""
        if self._link is not None:
            return
        self._busy = torch.multiprocessing.get_context("spawn").Value("d", 0.0, lock=False)
        level = logging.getLogger().getEffectiveLevel()
        link = ChildLink(
            "baton-engine-core",
            run_engine_child,
            (self.config, self._busy, self._log_format, level, self._threads),
            self._on_message,
            self._on_lost,
        )
        (self.info,) = await link.start(timeout_s)  # raises, naming why, if the engine was not built
        self._link = link

    def start(self) -> None:
        raise TypeError("a ProcessEngine starts with `await start_process()`")

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop the child: what is in flight ends with finish_reason 'abort', then every stream left
        fails with EngineDeadError."""
        if self._stopped:
            return
        self._stopped = True
        if self._link is not None:
            await self._link.close(timeout_s)
        self._fail_calls(EngineDeadError("engine shut down"))
        self._fail_all(EngineDeadError("engine shut down"))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        raise TypeError("a ProcessEngine stops with `await aclose()`")

    async def __aenter__(self) -> ProcessEngine:
        await self.start_process()
        return self

    @property
    def is_running(self) -> bool:
        return self._link is not None and self._link.alive and not self._stopped

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._link.pid if self._link is not None else None

    def stalled_for(self) -> float:
        if not self.is_running or self._error is not None:
            return math.inf
        since = self._busy.value
        return 0.0 if since == 0.0 else max(0.0, time.monotonic() - since)

    # -- the callers' side -----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validator.validate(prompt_token_ids, params)

    def _put(self, command: Any) -> None:
        """Send a command to the child (any thread). A call's future stays here, under a number the
        child's reply names; a call whose function or arguments do not pickle raises TypeError."""
        link = self._link
        if link is None:
            return
        number = None
        if isinstance(command, _Call):
            number = next(self._call_ids)
            self._calls[number] = command.reply
            command = _Call(command.fn, command.args, number)
        try:
            with self._send_lock:
                link.send(command)
        except Exception as exc:  # a lambda, a closure, an argument that does not pickle
            if number is None:
                raise
            del self._calls[number]
            raise TypeError(f"an engine call's function and arguments must pickle: {exc}") from exc

    # -- the child's messages (on the event loop that started it) --------------------------------
    def _on_message(self, msg: Message) -> None:
        kind = msg[0]
        if kind == "out":
            self._deliver(msg[1])
        elif kind == "error":
            self._send(msg[1], msg[2], last=True)
        elif kind == "reply":
            reply = self._calls.pop(msg[1], None)
            if reply is not None and reply.set_running_or_notify_cancel():
                if msg[2]:
                    reply.set_result(msg[3])
                else:
                    reply.set_exception(msg[3])
        elif kind == "dead":
            if not self._stopped:
                self._error = RuntimeError(msg[1])
            self._fail_calls(EngineDeadError(msg[1]))
            self._fail_all(EngineDeadError(msg[1]))
        else:
            logger.error("engine process sent an unknown message %r", kind)

    def _on_lost(self) -> None:
        logger.error("engine process exited unexpectedly: this worker's requests cannot progress")
        self._error = RuntimeError("the engine process exited")
        self._fail_calls(EngineDeadError("the engine process exited"))
        self._fail_all(EngineDeadError("the engine process exited"))
        if self.on_lost is not None:
            self.on_lost()

    def _fail_calls(self, error: BaseException) -> None:
        calls, self._calls = self._calls, {}
        for reply in calls.values():
            if reply.set_running_or_notify_cancel():
                reply.set_exception(error)


def engine_info(core: EngineCore) -> dict[str, Any]:
    """What a worker needs to know of its engine: its KV cache's layout and size, its attention
    backend (a child's "ready" adds its KV cache, exported for the worker's KV receiver)."""
    return {
        "layout": kv_layout(core),
        "num_blocks": core.kv_manager.pool.num_blocks,
        "attention_backend": core.attention_backend,
    }


# -- the child ---------------------------------------------------------------------------------------
class _EngineChild(AsyncEngine):
    """The step loop of AsyncEngine on the child's main thread, its results sent to the worker."""

    def __init__(self, core: EngineCore, conn: Connection, busy: Any) -> None:
        super().__init__(core)
        self._conn = conn
        self._busy_value = busy
        self._send_lock = threading.Lock()  # the step loop and the command reader both reply

    def read_commands(self) -> None:
        """Feed the worker's commands to the step loop until it says stop or goes away."""
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, tuple) and msg[:1] == ("stop",):
                    break
                self._commands.put(msg)
        except (EOFError, OSError):
            pass
        self._commands.put(_STOP)

    def _emit(self, msg: Message) -> None:
        # the worker gone: the command reader stops the loop
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(msg)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        if outputs:
            self._emit(("out", outputs))

    def _send(self, request_id: str, item: EngineOutput | BaseException, last: bool) -> None:
        self._emit(("error", request_id, item))

    def _fail_all(self, error: BaseException) -> None:
        self._emit(("dead", str(error)))

    def _reply(self, reply: Any, ok: bool, value: Any) -> None:
        try:
            self._emit(("reply", reply, ok, value))
        except Exception as exc:  # a result that does not pickle: the caller hears why
            unsent = RuntimeError(f"engine call result could not be sent: {exc!r}")
            self._emit(("reply", reply, False, unsent))

    def _set_busy(self, since: float | None) -> None:
        self._busy_value.value = since if since is not None else 0.0

    def _in_flight_ids(self) -> list[str]:
        return list(self.core.stats().request_ids)


def run_engine_child(
    conn: Connection, config: EngineConfig, busy: Any, log_format: str, log_level: int, threads: int | None
) -> None:
    """The child's entry point (spawned): builds the engine, then steps until told to stop or the
    worker is gone; killed with the worker."""
    terminate_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=log_format, force=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        core = EngineCore(config)
    except Exception as exc:
        logger.exception("the engine process could not build its engine")
        conn.send(("start_failed", f"{type(exc).__name__}: {exc}"))
        return
    engine = _EngineChild(core, conn, busy)
    conn.send(("ready", {**engine_info(core), "kv_caches": SharedKVCaches.export(core.kv_caches)}))
    threading.Thread(target=engine.read_commands, name="baton-engine-commands", daemon=True).start()
    engine._run()
