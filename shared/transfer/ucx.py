"""KV transfer over UCX with `ucxx` (asyncio): TCP on plain hosts, RDMA/NVLink/shared memory where UCX
finds them. Speaks the protocol of `protocol.py`.

- Control messages travel as `send_obj` sends them (their size, then their JSON), read back with the
  size checked first (a peer cannot make the receiver allocate what it likes); a layer's payload as
  one tagged message straight from the sender's tensor (CPU via a NumPy view, CUDA via
  `__cuda_array_interface__`) into one of two per-connection staging buffers on the receiver's
  `device`, used in turn, each grown to the largest layer seen and reused across layers and
  requests. On a GPU, the work the receiver queued on a buffer (checksum, scatter into the cache) is
  only waited for when that buffer comes round again, so nothing waits for the device per layer.
- A sender keeps a few endpoints per receiver and multiplexes its pushes over them (`pool.py`): a
  burst of requests does not pay for a burst of connections, and the receiver's staging memory
  stays bounded by the endpoints it serves.
- `ucxx` is imported on first use: importing this module is cheap and leaves UCX's environment alone.
- ucxx 0.52 listens on every interface: its Python `create_listener` takes no address (the C++
  ListenerBuilder's `host()` is not exposed), so `host`/`advertise_host` only decide the published
  address. With a `TransferSecret` on both ends, every connection authenticates before anything
  else is read from it (`auth.py`). UCX's own UCX_NET_DEVICES and UCX_TLS restrict the devices and
  transports it uses.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

import torch

from baton.shared.transfer.auth import TransferSecret
from baton.shared.transfer.base import KVLayout, KVReceiveHandler, KVReceiver, TransferError
from baton.shared.transfer.faults import FaultConfig
from baton.shared.transfer.pool import PooledKVSender
from baton.shared.transfer.protocol import (
    MAX_MESSAGE_NBYTES,
    Channel,
    ChannelClosed,
    InboundConnections,
    ProtocolError,
    decode_message,
    encode_message,
)

logger = logging.getLogger(__name__)

SCHEME = "ucx://"
_T = TypeVar("_T")


def _ucxx() -> ModuleType:
    import ucxx  # deferred: the import starts UCX's machinery and sets UCX_* environment defaults

    return ucxx


class _UcxContext:
    """ucxx's process-wide context, bound to the event loop that uses it.

    ucxx by default waits for a request by re-polling it with `asyncio.sleep(0)`: an idle connection
    then keeps a core busy. With Python futures a notifier thread completes them instead (idle cost
    ~0), but the futures belong to the loop the context was created on, so a new loop (a test's new
    `asyncio.run`) gets a fresh context."""

    loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def ready(cls) -> ModuleType:
        ucxx = _ucxx()
        loop = asyncio.get_running_loop()
        if cls.loop is not loop:
            if cls.loop is not None:
                ucxx.reset()
            else:
                # The notifier thread is not a daemon: stop it before the interpreter joins threads at
                # exit (the hook concurrent.futures uses), or a process that never closed its ends hangs.
                threading._register_atexit(ucxx.stop_notifier_thread)  # type: ignore[attr-defined]
            ucxx.init(enable_python_future=True)
            cls.loop = loop
        return ucxx

    @classmethod
    def stop(cls) -> None:
        if cls.loop is not None:
            _ucxx().stop_notifier_thread()


def ucx_for_this_loop() -> ModuleType:
    """The `ucxx` module, initialized for the running event loop as this module uses it (Python
    futures, no busy polling); for tools that speak raw UCX beside Baton's transfer."""
    return _UcxContext.ready()


def stop_ucx() -> None:
    """Stop UCX's notifier thread; call before the event loop that used UCX closes (after every
    receiver and sender closed). The next use starts UCX afresh."""
    _UcxContext.stop()


def parse_ucx_address(address: str) -> tuple[str, int]:
    """Split "ucx://HOST:PORT" (IPv6: "ucx://[::1]:PORT") into (host, port); ValueError if malformed."""
    host, sep, port = address.removeprefix(SCHEME).rpartition(":")
    if not address.startswith(SCHEME) or not sep or not host or not port.isdigit():
        raise ValueError(f"not a UCX address (ucx://HOST:PORT): {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def format_ucx_address(host: str, port: int) -> str:
    return f"{SCHEME}[{host}]:{port}" if ":" in host else f"{SCHEME}{host}:{port}"


def as_ucx_buffer(t: torch.Tensor) -> Any:
    """What ucxx reads or writes: a NumPy view of a CPU tensor, a CUDA tensor as is (it exposes
    `__cuda_array_interface__`). t: [nbytes] uint8, contiguous."""
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        return t
    raise ValueError(f"UCX transfer supports CPU and CUDA tensors, not {t.device}")


class _Truncated(Exception):
    """The incoming message was larger than the buffer posted for it (consumed and dropped)."""


class _UcxChannel(Channel):
    """A ucxx endpoint as a `Channel`."""

    def __init__(self, ep: Any, device: torch.device) -> None:
        self._ep = ep
        self._device = device
        self._staging: list[torch.Tensor | None] = [None, None]  # each: [capacity] uint8 on `device`
        self._read: list[torch.cuda.Event | None] = [None, None]  # the queued reads of each buffer
        self._turn = 0  # the buffer the next payload goes into
        self._closed_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None or bool(self._ep.closed)

    async def send_message(self, msg: dict[str, Any]) -> None:
        await self._io(self._ep.send_obj(encode_message(msg)))

    async def recv_message(
        self, timeout_s: float | None = None, max_nbytes: int = MAX_MESSAGE_NBYTES
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout_s):
                return decode_message(await self._recv_sized(max_nbytes))
        except _Truncated:
            raise ProtocolError("a payload arrived where a message was expected") from None

    async def _recv_sized(self, max_nbytes: int) -> bytearray:
        """What `send_obj` sent: its size (8 bytes), checked against `max_nbytes`, then its body."""
        size = array.array("Q", [0])
        await self._io(self._ep.recv(size))
        if size[0] > max_nbytes:
            raise ProtocolError(f"a message of {size[0]} bytes announced, at most {max_nbytes} accepted")
        data = bytearray(size[0])
        await self._io(self._ep.recv(data))
        return data

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self._io(self._ep.send(as_ucx_buffer(payload)))

    async def recv_payload(self, nbytes: int, timeout_s: float | None = None) -> torch.Tensor | None:
        """The payload lies in a staging buffer that the call after next overwrites; on a GPU the caller's
        work on it must be queued on the current stream before the next call (that call marks it)."""
        turn, self._turn = self._turn, 1 - self._turn
        if self._device.type == "cuda":
            previous = torch.cuda.Event()
            previous.record()  # the reads queued on the buffer the last payload went into
            self._read[1 - turn] = previous
            pending = self._read[turn]
            if pending is not None and not pending.query():
                await asyncio.to_thread(pending.synchronize)
        staging = self._staging[turn]
        if staging is None or staging.numel() < nbytes:
            self._staging[turn] = None  # free the old buffer before allocating the larger one
            staging = self._staging[turn] = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
            if self._device.type == "cuda":
                # The allocator may hand out memory that kernels still queued on this stream use (it
                # counts on stream order); UCX writes outside that order, so let them finish first.
                await asyncio.to_thread(torch.cuda.current_stream(self._device).synchronize)
        buffer = staging[:nbytes]
        try:
            await self._io(self._ep.recv(as_ucx_buffer(buffer)), timeout_s)
        except _Truncated:
            return None
        return buffer

    def close(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            self._ep.abort()  # pending operations on both ends are cancelled

    async def _io(self, op: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        """Await one ucxx operation, mapping its errors onto the Channel contract. A peer-closed endpoint
        is left to ucxx, which still delivers messages that arrived before the close."""
        if self._closed_reason is not None:
            op.close()
            raise ChannelClosed(self._closed_reason)
        errors = _ucxx().exceptions
        try:
            async with asyncio.timeout(timeout_s):  # unlike 3.11's wait_for, never swallows a cancellation
                return await op
        except errors.UCXMessageTruncatedError:
            raise _Truncated from None
        except Exception as e:
            # ucxx raises UCXError subclasses; an endpoint aborted under a pending call can surface
            # as other errors from its torn-down internals
            if isinstance(e, errors.UCXError) or self._closed_reason is not None:
                raise ChannelClosed(self._closed_reason or f"{type(e).__name__}: {e}") from e
            raise


class UcxKVReceiver(KVReceiver):
    """Listens for UCX senders; each connection is served by its own task."""

    def __init__(
        self,
        layout: KVLayout,
        handler: KVReceiveHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        device: torch.device | None = None,
        advertise_host: str | None = None,
        idle_timeout_s: float = 30.0,
        secret: TransferSecret | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        """`secret`: senders must prove it (and this receiver proves it to them) before anything else
        is read from their connections; `handshake_timeout_s`: how long a new connection may take to."""
        self.layout = layout
        self.address = ""  # "ucx://HOST:PORT" once started
        self._inbound = InboundConnections(layout, handler, secret, handshake_timeout_s)
        self._host = advertise_host or host
        self._port = port
        self._device = device if device is not None else torch.device("cpu")
        self._idle_timeout_s = idle_timeout_s
        self._listener: Any = None
        self._connections: dict[asyncio.Task[Any], _UcxChannel] = {}
        self._connection_ids = itertools.count(1)
        self._closing = False

    async def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("UcxKVReceiver already started")
        self._listener = _UcxContext.ready().create_listener(self._on_connect, port=self._port)
        self.address = format_ucx_address(self._host, self._listener.port)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop listening and drop every connection (in-progress requests fail)."""
        self._closing = True
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for channel in self._connections.values():
            channel.close("receiver closed")
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # ucxx tracks its own wrapper of each connection handler; let them retire so the listener is
        # not finalized with "live handlers" (a private ucxx method, hence the guard)
        wait_for_clients = getattr(listener, "_wait_for_active_clients", None)
        if wait_for_clients is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wait_for_clients(), timeout_s)

    async def _on_connect(self, ep: Any) -> None:
        """ucxx's listener callback, run as a task on the loop that called `start()`."""
        channel = _UcxChannel(ep, self._device)
        task = asyncio.current_task()
        if self._closing or task is None:
            channel.close("receiver closed")
            return
        # ucxx does not tell who connected: the connection is named by its number
        peer = f"UCX connection #{next(self._connection_ids)} to {self.address}"
        self._connections[task] = channel
        try:
            connection = self._inbound.new(peer, self.address)
            await connection.serve(channel, self._idle_timeout_s)
        finally:
            del self._connections[task]


class UcxKVSender(PooledKVSender):
    """Pushes to `UcxKVReceiver`s over pooled endpoints (see `pool.py`)."""

    def __init__(
        self,
        layout: KVLayout,
        faults: FaultConfig | None = None,
        connect_timeout_s: float = 5.0,
        reply_timeout_s: float = 10.0,
        max_pushes_per_address: int = 128,
        connections_per_address: int = 4,
        secret: TransferSecret | None = None,
    ) -> None:
        super().__init__(
            layout, faults, reply_timeout_s, max_pushes_per_address, connections_per_address, secret
        )
        self._connect_timeout_s = connect_timeout_s

    def _check_address(self, address: str) -> None:
        parse_ucx_address(address)

    async def _connect(self, address: str) -> Channel:
        host, port = parse_ucx_address(address)
        ucxx = _UcxContext.ready()
        try:
            ep = await asyncio.wait_for(
                ucxx.create_endpoint(host, port, connect_timeout=self._connect_timeout_s),
                self._connect_timeout_s + 1.0,
            )
        except (OSError, asyncio.TimeoutError, ucxx.exceptions.UCXError) as e:
            detail = str(e) or f"no answer within {self._connect_timeout_s:g} s"
            raise TransferError(f"KV receiver {address} is unreachable: {type(e).__name__}: {detail}") from e
        return _UcxChannel(ep, torch.device("cpu"))  # a sender receives only messages
