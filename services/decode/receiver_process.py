"""The decode worker's KV receiver, in a process of its own.

Every UCX completion reaches Python through ucxx's progress thread, its notifier thread and the
receiving event loop. In the decode worker those threads contend for the GIL with the engine thread,
which holds it for most of each step: measured on an H100, the receiving side read messages 0.3-0.75 s
after they were sent, capping handoffs at ~50 requests/s. The child process runs no engine. It maps
the worker's KV cache (CUDA IPC on a GPU, shared memory on a CPU), writes each pushed run of layers
straight into the reserved blocks, verifies the push, and hands the worker one message per request.

Block ownership, the contract that keeps a late write out of a block that was given to another request:
- the worker announces a reservation (`reserve`) with an event that completes once the steps queued
  when it was made have run (one in flight may still write a block an aborted request gave up); the
  child's first write for it waits for that event on the device;
- the child writes only into announced reservations and forgets one when it completes, fails or is
  revoked;
- the worker frees an announced, uncommitted reservation's blocks only after `revoke` returned, or
  after the child reported it failed: either way the child forgot it and its writes have landed;
- `complete` reaches the worker after the request's writes have landed.

Messages over the pipe (pickled tuples; CUDA tensors and events travel as IPC handles):
    worker -> child: ("reserve", request_id, block_ids, ready_event) | ("revoke", request_id)
                     | ("verdict", request_id, ack_payload, error) | ("stop",)
    child -> worker: ("ready", address) | ("complete", request_id, trailer, nbytes)
                     | ("fail", request_id, reason) | ("revoked", request_id) | ("start_failed", error)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch
import torch.multiprocessing

from baton.services.lifecycle import terminate_with_parent
from baton.shared.background import BackgroundTasks
from baton.shared.child_link import ChildLink, ParentLink
from baton.shared.engine.attention import get_attention_backend
from baton.shared.engine.host_to_device import host_to_device
from baton.shared.engine.kv_cache import (
    FenceHandle,
    KVCaches,
    SharedKVCaches,
    check_kv_run,
    scatter_kv_run,
)
from baton.shared.transfer import KVLayout, TransferError, TransferSecret, UcxKVReceiver, stop_ucx

logger = logging.getLogger(__name__)

_REVOKED_MEMORY = 4096  # revoked request ids the child remembers, so their late pushes are refused at once


@dataclass(frozen=True)
class ReceiverSpec:
    """How the child listens and writes; pickled to it at start."""

    layout: KVLayout
    host: str
    port: int  # 0 picks a free one
    advertise_host: str | None
    attention_backend: str  # a resolved name: "torch" or "triton"
    log_format: str
    log_level: int
    idle_timeout_s: float = 30.0
    announce_wait_s: float = 1.0  # how long a begin waits for its reservation to be announced
    secret: TransferSecret | None = None  # senders must prove it (--kv-transfer-secret); never shown
    handshake_timeout_s: float = 10.0  # a connection that has not authenticated by then is dropped


class HandoffHandler(Protocol):
    """What the worker does with a request whose KV landed in its blocks (the decode service)."""

    async def complete(self, request_id: str, trailer: dict[str, Any], nbytes: int) -> dict[str, Any]:
        """Admit the request; return the ack payload, or raise TransferError to nack it."""

    def fail(self, request_id: str, reason: str) -> None:
        """The push broke; the child forgot the reservation and its writes landed: end the request."""


# -- the worker's end ------------------------------------------------------------------------------
class ReceiverProcess:
    """Starts the receiving child and speaks to it from the worker's event loop."""

    def __init__(
        self, spec: ReceiverSpec, kv_caches: KVCaches | SharedKVCaches, handler: HandoffHandler
    ) -> None:
        """`kv_caches`: the worker's own cache, or one an engine core in another process exported."""
        self.spec = spec
        self.address = ""  # "ucx://HOST:PORT" once started
        # this process exported its own cache to the child (an engine core's process exports its own)
        self._exports_cuda_cache = not isinstance(kv_caches, SharedKVCaches) and kv_caches[0][0].is_cuda
        self._handler = handler
        self._link = ChildLink("baton-kv-receiver", run_child, (spec, kv_caches), self._dispatch, self._lost)
        self._revoking: dict[str, asyncio.Future[None]] = {}
        self._tasks = BackgroundTasks()
        self.on_lost: Callable[[], None] | None = None  # called if the child dies while the worker runs

    @property
    def alive(self) -> bool:
        return self._link.alive

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._link.pid

    async def start(self, timeout_s: float = 180.0) -> None:
        (self.address,) = await self._link.start(timeout_s)

    def reserve(self, request_id: str, block_ids: list[int], ready: Any) -> None:
        """Announce a reservation; `ready`: the engine's fence event, or its FenceHandle (None off the
        GPU)."""
        self._link.send(("reserve", request_id, block_ids, ready))

    async def revoke(self, request_id: str) -> None:
        """Take a reservation back; returns once the child no longer writes into it (or is gone)."""
        if not self._link.alive:
            return
        waiter = self._revoking.get(request_id)
        if waiter is None:
            waiter = self._revoking[request_id] = asyncio.get_running_loop().create_future()
            self._link.send(("revoke", request_id))
        await asyncio.shield(waiter)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (its connections close; pushes in progress fail) and wait for it."""
        await self._link.close(timeout_s)
        if self._exports_cuda_cache:
            torch.cuda.ipc_collect()  # the child's mappings of the cache are gone
        self._nothing_writes()
        await self._tasks.wait(timeout_s)

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "complete":
            self._tasks.spawn(self._complete(msg[1], msg[2], msg[3]))
        elif kind == "fail":
            self._handler.fail(msg[1], msg[2])
        elif kind == "revoked":
            waiter = self._revoking.pop(msg[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            logger.error("KV receiver process sent an unknown message %r", kind)

    async def _complete(self, request_id: str, trailer: dict[str, Any], nbytes: int) -> None:
        payload: dict[str, Any] | None = None
        error: str | None = None
        try:
            payload = await self._handler.complete(request_id, trailer, nbytes)
        except TransferError as e:
            error = str(e)
        except Exception as e:
            logger.exception("completing the handoff of %s failed", request_id)
            error = f"decode worker error: {e!r}"
        self._link.send(("verdict", request_id, payload, error))

    def _lost(self) -> None:
        self._nothing_writes()
        logger.error("KV receiver process exited unexpectedly: this worker can no longer receive KV")
        if self.on_lost is not None:
            self.on_lost()

    def _nothing_writes(self) -> None:
        for waiter in self._revoking.values():
            if not waiter.done():
                waiter.set_result(None)
        self._revoking.clear()


# -- the child -------------------------------------------------------------------------------------
def run_child(conn: Connection, spec: ReceiverSpec, kv_caches: KVCaches | SharedKVCaches) -> None:
    """The child's entry point (spawned). Exits when told to stop or when the worker is gone; killed
    with it, so that its pushes break off at once, as they would in one process."""
    terminate_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format, force=True)
    if isinstance(kv_caches, SharedKVCaches):
        kv_caches = kv_caches.open()  # from the engine core's process, which allocated it
    device = kv_caches[0][0].device  # with its index, unlike the engine's configured device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    asyncio.run(_serve_child(conn, spec, kv_caches, device))
    del kv_caches  # let go of the worker's tensors before exiting, so it can account for them
    gc.collect()


async def _serve_child(
    conn: Connection, spec: ReceiverSpec, kv_caches: KVCaches, device: torch.device
) -> None:
    writer = _CacheWriter(spec, kv_caches, device)
    parent = writer.parent = ParentLink(conn, writer.dispatch)
    parent.stopped.add_done_callback(lambda _: writer.end_verdicts())
    receiver = UcxKVReceiver(
        spec.layout,
        writer,
        spec.host,
        spec.port,
        device,
        spec.advertise_host,
        spec.idle_timeout_s,
        spec.secret,
        spec.handshake_timeout_s,
    )
    try:
        await receiver.start()
    except Exception as e:
        parent.send(("start_failed", f"{type(e).__name__}: {e}"))
        return
    parent.listen()
    parent.send(("ready", receiver.address))
    try:
        await parent.stopped
    finally:
        await receiver.close()
        stop_ucx()


@dataclass
class _Announced:
    """A reservation the worker announced."""

    block_ids: list[int]
    ready: torch.cuda.Event | None  # waited for on the device before the first write
    index: torch.Tensor | None = None  # [num_blocks] long, on the device: made at begin
    receiving: bool = False
    nbytes: int = 0


class _CacheWriter:
    """The child's KVReceiveHandler: writes pushed layers into the mapped cache."""

    def __init__(self, spec: ReceiverSpec, kv_caches: KVCaches, device: torch.device) -> None:
        self.parent: ParentLink | None = None  # set before any message
        self._spec = spec
        self._kv_caches = kv_caches
        self._device = device
        self._attention = get_attention_backend(spec.attention_backend)
        self._announced: dict[str, _Announced] = {}
        self._revoked: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._awaiting_announcement: dict[str, asyncio.Future[None]] = {}
        self._verdicts: dict[str, asyncio.Future[tuple[dict[str, Any] | None, str | None]]] = {}
        self._tasks = BackgroundTasks()

    # -- the worker's messages ---------------------------------------------------------------------
    def send(self, msg: tuple[Any, ...]) -> None:
        assert self.parent is not None
        self.parent.send(msg)

    def dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "reserve":
            request_id = msg[1]
            ready = msg[3].open() if isinstance(msg[3], FenceHandle) else msg[3]
            self._announced[request_id] = _Announced(list(msg[2]), ready)
            waiter = self._awaiting_announcement.pop(request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "revoke":
            self._tasks.spawn(self._revoke(msg[1]))
        elif kind == "verdict":
            verdict = self._verdicts.pop(msg[1], None)
            if verdict is not None and not verdict.done():
                verdict.set_result((msg[2], msg[3]))

    async def _revoke(self, request_id: str) -> None:
        announced = self._announced.pop(request_id, None)
        self._remember_revoked(request_id)
        if announced is not None and announced.receiving:
            await self._writes_landed()
        self.send(("revoked", request_id))

    def end_verdicts(self) -> None:
        """The worker is stopping or gone: no verdict will come."""
        for verdict in self._verdicts.values():
            if not verdict.done():
                verdict.set_result((None, "the decode worker is stopping"))

    # -- KVReceiveHandler --------------------------------------------------------------------------
    async def begin(self, request_id: str, block_ids: list[int], num_layers: int) -> None:
        announced = self._announced.get(request_id)
        if announced is None and request_id not in self._revoked:
            # announced before the router heard of the reservation, so this is rare: a begin read
            # before the pipe's message was
            waiter = self._awaiting_announcement.setdefault(
                request_id, asyncio.get_running_loop().create_future()
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), self._spec.announce_wait_s)
            self._awaiting_announcement.pop(request_id, None)
            announced = self._announced.get(request_id)
        if announced is None:
            raise TransferError(f"the decode worker holds no reservation for {request_id!r}")
        if announced.receiving:
            raise TransferError(f"request {request_id!r} is already receiving KV from another push")
        if block_ids != announced.block_ids or num_layers != self._spec.layout.num_layers:
            raise TransferError(
                f"push for {request_id!r} names blocks {block_ids} x {num_layers} layers; "
                f"reserved {announced.block_ids} x {self._spec.layout.num_layers}"
            )
        announced.receiving = True
        announced.index = host_to_device(block_ids, torch.long, self._device)

    def write_layers(self, request_id: str, first_layer: int, kv: torch.Tensor) -> None:
        announced = self._announced.get(request_id)
        if announced is None or announced.index is None:
            raise TransferError(f"request {request_id!r} was aborted while its KV arrived")
        try:
            check_kv_run(self._kv_caches, first_layer, kv, len(announced.block_ids))
        except ValueError as e:
            raise TransferError(str(e)) from e
        if announced.ready is not None:
            torch.cuda.current_stream(self._device).wait_event(announced.ready)
            announced.ready = None
        scatter_kv_run(self._attention, self._kv_caches, first_layer, kv, announced.index)
        announced.nbytes += kv.numel() * kv.element_size()

    async def complete(self, request_id: str, trailer: dict[str, Any]) -> dict[str, Any]:
        announced = self._announced.get(request_id)
        if announced is None:
            raise TransferError(f"request {request_id!r} was aborted while its KV arrived")
        await self._writes_landed()
        verdict = self._verdicts[request_id] = asyncio.get_running_loop().create_future()
        self.send(("complete", request_id, trailer, announced.nbytes))
        payload, error = await verdict
        if error is not None or payload is None:
            raise TransferError(error or "the decode worker sent no ack")
        self._announced.pop(request_id, None)
        return payload

    def fail(self, request_id: str, reason: str) -> None:
        announced = self._announced.pop(request_id, None)
        if announced is None:
            return  # revoked: the worker already ended it
        self._tasks.spawn(self._report_failure(request_id, reason))

    async def _report_failure(self, request_id: str, reason: str) -> None:
        await self._writes_landed()  # the worker frees the blocks when it hears of the failure
        self.send(("fail", request_id, reason))

    # -- helpers -----------------------------------------------------------------------------------
    async def _writes_landed(self) -> None:
        """Wait (without blocking the loop) for the writes queued so far on the device."""
        if self._device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        while not event.query():
            await asyncio.sleep(0.0002)

    def _remember_revoked(self, request_id: str) -> None:
        self._revoked[request_id] = None
        while len(self._revoked) > _REVOKED_MEMORY:
            self._revoked.popitem(last=False)
