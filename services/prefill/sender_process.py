"""The prefill worker's KV sender, in a process of its own.

A push's UCX threads, checksums and sends share the worker process with the engine thread, and
slow its steps down: measured on an H100 (`benchmarks/prefill_launch_study.py`), 8192-token prefill
steps launched in 14 ms alone and in 51 ms beside a push of 150 requests/s in the same process, as a
served prefill worker's did (44 ms of CPU for 5,600 tokens). The child process runs no engine. It maps
the worker's KV cache (CUDA IPC on a GPU, shared memory on a CPU), copies each computed prompt's
blocks out once the engine's step has written them, and pushes them to the decode worker.

Block ownership: the engine keeps an announced prompt's blocks after the request ended
(EngineCore.release_prompt_kv); the child answers every "ship" with exactly one "released" once it
will not read those blocks any more (its copy landed, or it did not copy), and only then does the
worker free them.

Messages over the pipe (pickled tuples; CUDA tensors and events travel as IPC handles):
    worker -> child: ("open", request_id, address, block_ids, num_layers)
                     | ("ship", request_id, block_ids, ready_event)
                     | ("finish", request_id, trailer, timeout_s) | ("abort", request_id, reason) | ("stop",)
    child -> worker: ("ready",) | ("start_failed", error) | ("released", request_id)
                     | ("finished", request_id, nbytes, push_ms, finish_timings)
                     | ("failed", request_id, error)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from baton.services.lifecycle import terminate_with_parent
from baton.shared.background import BackgroundTasks
from baton.shared.byte_budget import ByteBudget
from baton.shared.child_link import ChildLink, Message, ParentLink
from baton.shared.engine.attention import get_attention_backend
from baton.shared.engine.host_to_device import host_to_device
from baton.shared.engine.kv_cache import KVCaches, gather_prompt_kv, layer_runs
from baton.shared.transfer import (
    FaultConfig,
    KVLayout,
    KVPushSession,
    TransferError,
    TransferSecret,
    UcxKVSender,
    stop_ucx,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderSpec:
    """How the child pushes; pickled to it at start."""

    layout: KVLayout
    faults: str  # FaultConfig.parse syntax
    max_pushes_per_address: int
    connections_per_address: int
    attention_backend: str  # a resolved name, "torch" or "triton": its block copy reads the cache
    log_format: str
    log_level: int
    copy_buffer_nbytes: int = 2 << 30
    """Device memory the child may hold in copied-out prompt KV that is not sent yet; a prompt that
    does not fit waits, its blocks held in the engine's cache (one larger than all of it goes alone)."""
    run_nbytes: int = 16 << 20
    """KV per message (whole layers, at least one): UCX moves messages of a few MiB at a fraction of
    its bandwidth (benchmarks/NOTES.md), and a prompt's copied-out KV leaves in a few of them."""
    secret: TransferSecret | None = None
    """Proved to every decode worker it connects to (--kv-transfer-secret); never shown."""


@dataclass(frozen=True)
class PushResult:
    nbytes: int
    push_ms: dict[str, float]  # where the push's time went, for the request log
    finish_timings: dict[str, float]


# -- the worker's end ------------------------------------------------------------------------------
class SenderProcess:
    """Starts the sending child and speaks to it from the worker's event loop."""

    def __init__(self, spec: SenderSpec, kv_caches: KVCaches, release: Callable[[str], None]) -> None:
        """`release(request_id)`: the child will not read the request's announced blocks any more
        (the engine's release_prompt_kv)."""
        self._release = release
        self._link = ChildLink("baton-kv-sender", run_child, (spec, kv_caches), self._dispatch, self._lost)
        self._results: dict[str, asyncio.Future[PushResult]] = {}
        self._unreleased: dict[str, int] = {}  # request -> ships the child has not released yet
        self.on_lost: Callable[[], None] | None = None  # called if the child dies while the worker runs

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._link.pid

    async def start(self, timeout_s: float = 180.0) -> None:
        await self._link.start(timeout_s)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (pushes in progress fail) and wait for it."""
        await self._link.close(timeout_s)
        self._forget_all("the KV sender stopped")

    def open(self, request_id: str, address: str, block_ids: list[int], num_layers: int) -> None:
        """Start a push: the child connects and announces the request while its prompt computes."""
        if not self._link.alive:
            raise TransferError("the KV sender process is not running")
        if request_id in self._results:
            raise ValueError(f"request {request_id!r} is already being pushed")
        self._results[request_id] = asyncio.get_running_loop().create_future()
        self._link.send(("open", request_id, address, block_ids, num_layers))

    def ship(self, request_id: str, block_ids: list[int], ready: Any) -> None:
        """The engine announced the request's computed prompt KV (see EngineCore.PromptKVSink)."""
        if not self._link.alive:
            self._release(request_id)  # nothing will read them
            return
        self._unreleased[request_id] = self._unreleased.get(request_id, 0) + 1
        self._link.send(("ship", request_id, block_ids, ready))

    async def finish(self, request_id: str, trailer: dict[str, Any], timeout_s: float) -> PushResult:
        """Send the trailer once the prompt's KV is pushed and wait for the receiver's ack. Raises
        TransferError if the push failed at any point."""
        result = self._results.get(request_id)
        if result is None:
            raise TransferError(f"no push of {request_id!r} is open")
        self._link.send(("finish", request_id, trailer, timeout_s))
        try:
            return await asyncio.shield(result)
        finally:
            if result.done():
                self._results.pop(request_id, None)

    def abort(self, request_id: str, reason: str) -> None:
        """Stop the push (the receiver hears of it); idempotent."""
        result = self._results.pop(request_id, None)
        if result is not None:
            if not result.done():
                result.set_exception(TransferError(f"push of {request_id!r} aborted: {reason}"))
            result.exception()  # retrieved: an aborted push's error is nobody's concern
            self._link.send(("abort", request_id, reason))

    def _dispatch(self, msg: Message) -> None:
        kind, request_id = msg[0], msg[1]
        if kind == "released":
            left = self._unreleased.get(request_id, 0) - 1
            if left > 0:
                self._unreleased[request_id] = left
            else:
                self._unreleased.pop(request_id, None)
            self._release(request_id)
        elif kind in ("finished", "failed"):
            result = self._results.get(request_id)
            if result is None or result.done():
                return  # aborted meanwhile
            if kind == "finished":
                result.set_result(PushResult(msg[2], msg[3], msg[4]))
            else:
                result.set_exception(TransferError(msg[2]))
        else:
            logger.error("KV sender process sent an unknown message %r", kind)

    def _lost(self) -> None:
        logger.error("KV sender process exited unexpectedly: this worker can no longer push KV")
        self._forget_all("the KV sender process exited")
        if self.on_lost is not None:
            self.on_lost()

    def _forget_all(self, reason: str) -> None:
        """The child is gone: nothing reads announced blocks any more, no push can finish."""
        for request_id in list(self._unreleased):
            self._release(request_id)
        self._unreleased.clear()
        for result in self._results.values():
            if not result.done():
                result.set_exception(TransferError(reason))
        self._results.clear()


# -- the child -------------------------------------------------------------------------------------
def run_child(conn: Connection, spec: SenderSpec, kv_caches: KVCaches) -> None:
    """The child's entry point (spawned). Exits when told to stop or when the worker is gone; killed
    with it, so that a killed worker's pushes break off at once, as they would in one process."""
    terminate_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format, force=True)
    device = kv_caches[0][0].device  # with its index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    asyncio.run(_serve_child(conn, spec, kv_caches, device))
    del kv_caches  # let go of the worker's tensors before exiting, so it can account for them
    gc.collect()


async def _serve_child(conn: Connection, spec: SenderSpec, kv_caches: KVCaches, device: torch.device) -> None:
    pusher = _Pusher(spec, kv_caches, device)
    parent = ParentLink(conn, pusher.dispatch)
    pusher.parent = parent
    parent.listen()
    parent.send(("ready",))
    try:
        await parent.stopped
    finally:
        await pusher.close()
        stop_ucx()


@dataclass
class _Push:
    """One request's push, as the child runs it."""

    task: asyncio.Task[None] | None = None
    shipped: asyncio.Future[tuple[list[int], Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    trailer: asyncio.Future[tuple[dict[str, Any], float]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    released: bool = False  # the worker heard it may free the announced blocks


class _Pusher:
    """The child's pushes, one task each: open, copy the prompt's KV out once announced, send it in
    runs of layers, finish with the trailer, report."""

    def __init__(self, spec: SenderSpec, kv_caches: KVCaches, device: torch.device) -> None:
        self._spec = spec
        self._kv_caches = kv_caches
        self._device = device
        self._attention = get_attention_backend(spec.attention_backend)
        self._sender = UcxKVSender(
            spec.layout,
            FaultConfig.parse(spec.faults),
            max_pushes_per_address=spec.max_pushes_per_address,
            connections_per_address=spec.connections_per_address,
            secret=spec.secret,
        )
        self._pushes: dict[str, _Push] = {}
        self._copy_buffer = ByteBudget(spec.copy_buffer_nbytes)  # copied-out KV not sent yet
        self._tasks = BackgroundTasks()
        self.parent: ParentLink | None = None

    def _send(self, msg: Message) -> None:
        assert self.parent is not None
        self.parent.send(msg)

    def dispatch(self, msg: Message) -> None:
        kind, request_id = msg[0], msg[1]
        if kind == "open":
            push = self._pushes[request_id] = _Push()
            push.task = self._tasks.spawn(self._push(request_id, push, msg[2], list(msg[3]), msg[4]))
            # also when the task is cancelled before it ever ran (open, ship and abort read at once)
            push.task.add_done_callback(lambda _: self._release_if_announced(request_id, push))
        elif kind == "ship":
            push_or_none = self._pushes.get(request_id)
            if push_or_none is None or push_or_none.shipped.done():
                self._send(("released", request_id))  # aborted: nothing reads these blocks
            else:
                push_or_none.shipped.set_result((list(msg[2]), msg[3]))
        elif kind == "finish":
            push_or_none = self._pushes.get(request_id)
            if push_or_none is not None and not push_or_none.trailer.done():
                push_or_none.trailer.set_result((msg[2], msg[3]))
        elif kind == "abort":
            push_or_none = self._pushes.pop(request_id, None)
            if push_or_none is not None and push_or_none.task is not None:
                push_or_none.task.cancel(msg[2])

    async def _push(
        self, request_id: str, push: _Push, address: str, block_ids: list[int], num_layers: int
    ) -> None:
        session: KVPushSession | None = None

        def release_if_announced() -> None:
            self._release_if_announced(request_id, push)

        timings: dict[str, float] = {}
        charge = 0  # bytes of the copy buffer this push holds
        kv: torch.Tensor | None = None
        started = time.monotonic()
        # its own task: the prompt computes (and is copied out) while it connects, and an abort while
        # it connects must still reach a receiver it announced the request to
        opening = asyncio.ensure_future(self._sender.open(address, request_id, block_ids, num_layers))
        try:
            await asyncio.wait({push.shipped, opening}, return_when=asyncio.FIRST_COMPLETED)
            if opening.done() and opening.exception() is not None:
                opening.result()  # a failed connection fails the push now, not once the prompt computed
            prompt_blocks, ready = await push.shipped
            announced = time.monotonic()
            # copied out as soon as the copy buffer has room, whatever the connection: the engine's
            # blocks wait only while earlier pushes hold the whole buffer (backpressure on the engine)
            charge = await self._copy_buffer.acquire(
                self._spec.layout.num_layers * self._spec.layout.layer_nbytes(len(prompt_blocks))
            )
            budgeted = time.monotonic()
            landed: torch.cuda.Event | None = None
            try:
                kv, landed = self._copy_out(prompt_blocks, ready)  # kv: [num_layers, 2, blocks, *block]
                while landed is not None and not landed.query():
                    await asyncio.sleep(0.0002)
            finally:
                if landed is not None:
                    landed.synchronize()  # cancelled while it was queued: the blocks are read first
                release_if_announced()
            copied = time.monotonic()
            session = live = await asyncio.shield(opening)
            opened = time.monotonic()
            layer_nbytes = kv[0].numel() * kv.element_size()
            *runs, (last, last_count) = layer_runs(kv.shape[0], layer_nbytes, self._spec.run_nbytes)
            for first, count in runs:
                await live.send_layers(first, kv[first : first + count])
            trailer, timeout_s = await push.trailer
            sent = opened

            def all_sent() -> None:  # its memory goes back before the reply
                nonlocal charge, sent
                sent = time.monotonic()
                self._copy_buffer.release(charge)
                charge = 0

            # the last run and the finish leave together: the finish does not queue behind other
            # pushes' payloads on the connection, and the receiver completes once the payload is in
            finishing = live.finish_with_layers(
                last, kv[last : last + last_count], trailer, timeout_s=timeout_s, on_sent=all_sent
            )
            nbytes, kv = kv.numel() * kv.element_size(), None  # the session holds what it still sends
            await finishing
            timings.update(
                engine_ms=(announced - started) * 1e3,
                buffer_ms=(budgeted - announced) * 1e3,  # waiting for room in the copy buffer
                copy_ms=(copied - budgeted) * 1e3,
                open_ms=(opened - copied) * 1e3,  # what the connection still needed after the copy
                send_ms=(sent - opened) * 1e3,
            )
            self._send(("finished", request_id, nbytes, timings, live.finish_timings))
        except asyncio.CancelledError as exc:
            release_if_announced()  # before waiting for a connection that may be slow to settle
            if session is None:
                await asyncio.wait([opening])
                session = opening.result() if opening.exception() is None else None
            if session is not None:
                await asyncio.shield(session.abort(str(exc.args[0]) if exc.args else "aborted"))
            raise
        except Exception as exc:
            release_if_announced()
            if session is not None:
                await asyncio.shield(session.abort(f"prefill worker: {exc!r}"))
            self._send(("failed", request_id, str(exc) if isinstance(exc, TransferError) else repr(exc)))
        finally:
            if self._pushes.get(request_id) is push:
                del self._pushes[request_id]
            release_if_announced()
            kv = None  # the copy's memory goes back to the allocator before its charge does
            if charge:
                self._copy_buffer.release(charge)

    def _release_if_announced(self, request_id: str, push: _Push) -> None:
        """Announced and not released yet: the engine's blocks go back now, whatever else is pending."""
        if not push.released and push.shipped.done() and not push.shipped.cancelled():
            push.released = True
            self._send(("released", request_id))

    def _copy_out(self, block_ids: list[int], ready: Any) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of the blocks' KV, every layer, behind the engine step that wrote it (`ready`);
        returns it and, on a GPU, the event of its landing (the blocks may go to other requests then)."""
        if self._device.type != "cuda":
            index = torch.tensor(block_ids, dtype=torch.long)
            return gather_prompt_kv(self._attention, self._kv_caches, index), None
        stream = torch.cuda.current_stream(self._device)
        if ready is not None:
            stream.wait_event(ready)
        index = host_to_device(block_ids, torch.long, self._device)
        kv = gather_prompt_kv(self._attention, self._kv_caches, index)
        landed = torch.cuda.Event()
        landed.record(stream)
        return kv, landed

    async def close(self) -> None:
        for push in list(self._pushes.values()):
            if push.task is not None:
                push.task.cancel("the prefill worker is stopping")
        await self._tasks.wait(5.0)
        with contextlib.suppress(Exception):
            await self._sender.close()
