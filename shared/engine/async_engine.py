"""Asyncio face of the engine: the core steps on its own thread; callers add a request, stream its
outputs and abort it. The worker services wrap this."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache import FenceHandle
from baton.shared.engine.outputs import EngineOutput, merge_outputs, merge_queued
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.engine.scheduler import SampledToken
from baton.shared.errors import UnavailableError

logger = logging.getLogger(__name__)

BURST_MIN_RESERVED = 16
"""Fewer requests waiting for their KV are not a burst: a light load never paces decode steps."""

T = TypeVar("T")


class EngineDeadError(UnavailableError):
    """The engine thread stopped (a fatal error or shutdown); no request can make progress."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Commit:
    request_id: str
    first_token: SampledToken
    num_cached_tokens: int


@dataclass(frozen=True)
class _Fail:
    request_id: str
    message: str


@dataclass(frozen=True)
class _Release:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run `fn(core, *args)` on the engine thread (between steps) and resolve `reply` with its result:
    a future, or the call's number when the engine runs in another process (engine_process.py)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    reply: Any


_STOP = object()


class OutputSink(Protocol):
    """Where a request's outputs go instead of a stream of its own (many requests sharing one
    consumer): every step's output as it is, unmerged, or the engine's fatal error, called on the
    event loop that added the request."""

    def put_nowait(self, item: EngineOutput | BaseException) -> None: ...


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt whose KV another worker pushes (see AsyncEngine.reserve)."""

    block_ids: list[int]
    outputs: AsyncGenerator[EngineOutput, None] | None  # starts once commit() runs; None with a sink
    ready: Any = None
    """When writers outside the engine need one, they write once it completed: a torch.cuda.Event, or a
    FenceHandle when the engine core runs in another process."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: OutputSink  # an asyncio.Queue read by AsyncEngine._outputs, or the caller's sink


class AsyncEngine:
    """Use as `async with AsyncEngine(core) as engine:` or call start() / shutdown()."""

    _stopped: bool
    _error: BaseException | None
    _fence_as_handle = False  # the engine core is in this process: its fences are events

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._init_frontend(core.config)

    def _init_frontend(self, config: EngineConfig) -> None:
        """What the callers' side holds: their streams and the commands for the engine."""
        self.config = config
        self.stream_interval = config.stream_interval
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._busy_since: float | None = None  # when the step in progress began (engine thread)
        self._uncommitted: dict[str, asyncio.AbstractEventLoop] = {}  # reservations, by their loop
        self._release: Callable[[str], Awaitable[None]] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(EngineCore(config))

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort everything in flight and stop the engine thread."""
        if self._thread is None or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        self._commands.put(_STOP)
        self._thread.join(timeout_s)

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """shutdown(), without blocking the event loop."""
        await asyncio.to_thread(self.shutdown)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def stalled_for(self) -> float:
        """Seconds the engine thread has been in its current step (0 between steps, idle included);
        infinite when it is not running (never started, shut down, or died). Forward progress, for
        liveness: a step stuck on a hung device or a deadlock grows without bound."""
        if not self.is_running or self._error is not None:
            return math.inf
        since = self._busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    # -- requests --------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming what is wrong with a request (see EngineCore.validate); on the caller's
        thread, touching no engine state."""
        self.core.validate(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[EngineOutput]:
        """Stream one request's outputs (one per step it got a token in); the last one has
        `finished` set. Bad input raises ValueError before anything is queued. Leaving the loop
        early (break, cancellation, client gone) aborts the request."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        async for out in self.add(request_id, prompt_token_ids, params):
            yield out

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
        validated: bool = False,
    ) -> AsyncGenerator[EngineOutput, None]:
        """Queue a request (ValueError on bad input or a duplicate id now) and return its output
        stream; leaving that stream early aborts the request. `validated`: the caller already ran
        `validate` on these very arguments."""
        stream = self._queue_request(request_id, prompt_token_ids, params, prefill_only, None, validated)
        return self._outputs(request_id, stream)

    def add_to_sink(
        self, sink: OutputSink, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request whose outputs go to `sink`; the caller aborts it if it stops listening."""
        self._queue_request(request_id, prompt_token_ids, params, False, sink)

    def _queue_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool,
        sink: OutputSink | None,
        validated: bool = False,
    ) -> _Stream:
        self._check_alive()
        if not validated:
            self.validate(prompt_token_ids, params)
        stream = self._open_stream(request_id, sink)
        self._put(_Add(request_id, list(prompt_token_ids), params, prefill_only))
        return stream

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: OutputSink | None = None,
    ) -> Reservation | None:
        """Hold KV blocks for a prompt another worker will push (see EngineCore.reserve); None when
        they don't fit. The output stream (or `sink`) starts once commit() runs."""
        self._check_alive()
        self.validate(prompt_token_ids, params)
        stream = self._open_stream(request_id, sink)
        written_outside = self._release is not None  # then the writer needs the fence
        try:
            block_ids, fence = await self.call(
                _reserve_fenced, request_id, prompt_token_ids, params, written_outside, self._fence_as_handle
            )
        except BaseException:
            self._close_stream(request_id)
            # the caller went away (cancelled) or the call failed: the engine may still have reserved
            # the blocks, so an abort follows the command (a no-op if nothing was reserved)
            self._put(_Abort(request_id))
            raise
        if block_ids is None:
            self._close_stream(request_id)
            return None
        if written_outside:
            self._uncommitted[request_id] = asyncio.get_running_loop()
        return Reservation(block_ids, self._outputs(request_id, stream) if sink is None else None, fence)

    def set_reservation_release(self, release: Callable[[str], Awaitable[None]]) -> None:
        """Someone outside the engine writes into reserved blocks (the decode worker's receiving
        process): before a reservation that was not committed is aborted or failed, `release(request_id)`
        runs on the loop that reserved it, and the blocks are freed only after it returned."""
        self._release = release

    def commit(self, request_id: str, first_token: SampledToken, num_cached_tokens: int) -> None:
        """The reserved prompt's KV is complete: admit it with its first token."""
        self._uncommitted.pop(request_id, None)
        self._put(_Commit(request_id, first_token, num_cached_tokens))

    def release_prompt_kv(self, request_id: str) -> None:
        """The request's announced prompt KV has been read: its blocks may go (see
        EngineCore.release_prompt_kv). Callable from any thread."""
        self._put(_Release(request_id))

    def fail(self, request_id: str, message: str) -> None:
        """End a request with finish_reason 'error' and this message."""
        self._end(request_id, _Fail(request_id, message))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(core, *args)` on the engine thread between steps (consistent reads such as stats()).
        A module-level function (or an EngineCore method) with plain arguments is what an engine in
        another process could run too; a lambda works here only."""
        self._check_alive()
        reply: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put(_Call(fn, args, reply))
        return await asyncio.wrap_future(reply)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncGenerator[EngineOutput, None]:
        """The request's outputs; a consumer that fell behind gets what queued up meanwhile merged into
        one output (as vLLM's output collector does), so a slow stream costs one message per visit, not
        one per engine step. After the first output, one carries at least `stream_interval` tokens
        (or the end)."""
        queue = stream.queue
        assert isinstance(queue, asyncio.Queue)
        finished, first = False, True
        held: EngineOutput | None = None  # tokens not yet handed out
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineOutput):
                    item = merge_queued(queue, item)
                if isinstance(item, BaseException):
                    if held is not None:
                        queue.put_nowait(item)  # raised on the next visit, after what was held
                        out, held = held, None
                        yield out
                        continue
                    raise item
                held = item if held is None else merge_outputs(held, item)
                finished = held.finished
                if finished or first or len(held.new_token_ids) >= self.stream_interval:
                    item, held, first = held, None, False
                    yield item
        finally:
            if not finished:
                self.abort(request_id)

    def _open_stream(self, request_id: str, sink: OutputSink | None = None) -> _Stream:
        stream = _Stream(asyncio.get_running_loop(), sink if sink is not None else asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        return stream

    def _close_stream(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its stream ends with finish_reason 'abort'."""
        self._end(request_id, _Abort(request_id))

    def _end(self, request_id: str, command: _Abort | _Fail) -> None:
        """Queue an abort or a failure; an uncommitted reservation's is queued once it was released."""
        loop = self._uncommitted.pop(request_id, None)
        if loop is None or self._release is None or loop.is_closed():
            self._put(command)
        else:
            asyncio.run_coroutine_threadsafe(self._release_then(self._release, request_id, command), loop)

    async def _release_then(
        self, release: Callable[[str], Awaitable[None]], request_id: str, command: _Abort | _Fail
    ) -> None:
        try:
            await release(request_id)
        except Exception:
            logger.exception("releasing the reservation of %s failed; freeing its blocks anyway", request_id)
        self._put(command)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped after a fatal error: {self._error!r}")
        if not self.is_running:
            raise EngineDeadError("engine is not running (call start() first, or it was shut down)")

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        pacing_s = self.core.config.burst_step_interval_ms / 1e3
        last_step = 0.0
        try:
            while True:
                if not self._apply_commands(block=not self.core.has_work()):
                    break
                if pacing_s and self._in_burst() and not self._hold(last_step + pacing_s):
                    break
                if self.core.has_work():
                    last_step = time.monotonic()
                    self._set_busy(last_step)
                    outputs = self.core.step()
                    self._set_busy(None)
                    self._deliver(outputs)
        except BaseException as exc:  # fatal: every caller must hear about it, nobody may hang
            logger.exception("engine thread died")
            self._error = exc
            self._fail_all(EngineDeadError(f"engine failed: {exc!r}"))
            return
        self._deliver(self.core.abort_requests(self._in_flight_ids()))
        self._fail_all(EngineDeadError("engine shut down"))

    def _in_burst(self) -> bool:
        """At least BURST_MIN_RESERVED requests wait for their pushed KV, and more than are decoding:
        a burst is being prefilled."""
        waiting = len(self.core.scheduler.reserved)
        return waiting >= BURST_MIN_RESERVED and waiting > len(self.core.scheduler.running)

    def _hold(self, until: float) -> bool:
        """Apply commands as they come until `until` or the end of the burst (see
        EngineConfig.burst_step_interval_ms). False once asked to stop."""
        while self._in_burst() and (left := until - time.monotonic()) > 0:
            try:
                command = self._commands.get(timeout=left)
            except queue.Empty:
                return True
            if not self._apply(command):
                return False
        return True

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; wait for one if `block`. False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if not self._apply(command):
                return False

    def _apply(self, command: Any) -> bool:
        """Apply one command; False if it is the request to stop."""
        if command is _STOP:
            return False
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            self._deliver(self.core.abort_requests([command.request_id]))
        elif isinstance(command, _Commit):
            self._commit(command)
        elif isinstance(command, _Fail):
            failed = self.core.fail_request(command.request_id, command.message)
            self._deliver([failed] if failed is not None else [])
        elif isinstance(command, _Release):
            self.core.release_prompt_kv(command.request_id)
        elif isinstance(command, _Call):
            self._call(command)
        return True

    def _commit(self, command: _Commit) -> None:
        try:
            out = self.core.commit_reserved(
                command.request_id, command.first_token, command.num_cached_tokens
            )
        except KeyError:
            return  # aborted while its KV was arriving; its stream already ended
        self._deliver([out])

    def _call(self, command: _Call) -> None:
        try:
            result = command.fn(self.core, *command.args)
        except Exception as exc:  # the caller's error, raised in the caller's coroutine
            self._reply(command.reply, False, exc)
        else:
            self._reply(command.reply, True, result)

    # -- where the engine thread's results go (an engine in another process sends them instead) ---
    def _put(self, command: Any) -> None:
        """Queue a command for the engine thread (any thread)."""
        self._commands.put(command)

    def _reply(self, reply: Any, ok: bool, value: Any) -> None:
        """Resolve a call's `reply` future with its result (`ok`) or its error."""
        if not reply.set_running_or_notify_cancel():
            return  # the caller went away
        if ok:
            reply.set_result(value)
        else:
            reply.set_exception(value)

    def _set_busy(self, since: float | None) -> None:
        """The step in progress began at `since` (None: between steps)."""
        self._busy_since = since

    def _in_flight_ids(self) -> list[str]:
        """The requests to abort when the engine stops: every one with a stream."""
        with self._lock:
            return list(self._streams)

    def _add(self, command: _Add) -> None:
        try:
            self.core.add_request(
                command.request_id,
                command.prompt_token_ids,
                command.params,
                command.prefill_only,
                validated=True,  # by _queue_request, on the caller's thread
            )
        except ValueError as exc:
            self._send(command.request_id, exc, last=True)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputSink, EngineOutput]]] = {}
        with self._lock:
            for out in outputs:
                rid = out.request_id
                stream = self._streams.pop(rid, None) if out.finished else self._streams.get(rid)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, batch in batches.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, batch)

    def _send(self, request_id: str, item: EngineOutput | BaseException, last: bool) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None and not stream.loop.is_closed():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.loop.is_closed():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)


_KEPT_FENCES: collections.deque[Any] = collections.deque(maxlen=4096)
"""Fences handed out as FenceHandles, kept alive here (their waiter opens them at once)."""


def _reserve_fenced(
    core: EngineCore,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    fenced: bool,
    as_handle: bool = False,
) -> tuple[list[int] | None, Any]:
    """EngineCore.reserve of a validated prompt, and the fence its outside writer waits for if `fenced`
    (as a FenceHandle if `as_handle`: for an engine core in another process than its writer's worker)."""
    block_ids = core.reserve(request_id, prompt_token_ids, params, validated=True)
    fence = core.fence() if fenced and block_ids is not None else None
    if fence is not None and as_handle:
        _KEPT_FENCES.append(fence)
        return block_ids, FenceHandle.of(fence, core.device)
    return block_ids, fence


def _put_all(batch: list[tuple[OutputSink, EngineOutput]]) -> None:
    for stream_queue, out in batch:
        stream_queue.put_nowait(out)
