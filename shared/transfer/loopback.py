"""In-process twin of the UCX transport, for unit tests and warm-up: same protocol, same validation.

Receivers register by name in a per-process registry on `start()` ("loopback://NAME") and leave it
on `close()`. A connection is a pair of asyncio queues; messages go through a JSON round trip and
payloads are copied, so what a handler sees is what it would see over the wire.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import torch

from baton.shared.transfer.auth import TransferSecret
from baton.shared.transfer.base import KVLayout, KVReceiveHandler, KVReceiver, TransferError
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

SCHEME = "loopback://"

_RECEIVERS: dict[str, LoopbackKVReceiver] = {}  # started receivers of this process, by name
_connection_ids = itertools.count(1)


class _Link:
    """State both ends of one loopback connection share."""

    def __init__(self) -> None:
        self.closed_reason: str | None = None


class _LoopbackChannel(Channel):
    """One end of an in-process connection: reads its inbox, writes the peer's."""

    def __init__(
        self, link: _Link, inbox: asyncio.Queue[tuple[str, Any]], outbox: asyncio.Queue[tuple[str, Any]]
    ) -> None:
        self._link = link
        self._inbox = inbox
        self._outbox = outbox

    @classmethod
    def pair(cls) -> tuple[_LoopbackChannel, _LoopbackChannel]:
        link = _Link()
        a: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        b: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        return cls(link, a, b), cls(link, b, a)

    @property
    def closed(self) -> bool:
        return self._link.closed_reason is not None

    async def send_message(self, msg: dict[str, Any]) -> None:
        self._put("msg", decode_message(encode_message(msg)))
        await asyncio.sleep(0)

    async def recv_message(
        self, timeout_s: float | None = None, max_nbytes: int = MAX_MESSAGE_NBYTES
    ) -> dict[str, Any]:
        kind, item = await self._get(timeout_s)
        if kind != "msg":
            raise ProtocolError("a payload arrived where a message was expected")
        nbytes = len(encode_message(item))
        if nbytes > max_nbytes:
            raise ProtocolError(f"a message of {nbytes} bytes announced, at most {max_nbytes} accepted")
        return item  # type: ignore[no-any-return]

    async def send_payload(self, payload: torch.Tensor) -> None:
        self._put("payload", payload.clone())  # the caller may reuse its buffer once this returns
        await asyncio.sleep(0)

    async def recv_payload(self, nbytes: int, timeout_s: float | None = None) -> torch.Tensor | None:
        kind, item = await self._get(timeout_s)
        if kind != "payload":
            raise ProtocolError("a message arrived where a payload was expected")
        return item if item.numel() <= nbytes else None

    def close(self, reason: str) -> None:
        if self._link.closed_reason is None:
            self._link.closed_reason = reason
            self._inbox.put_nowait(("closed", reason))  # wakes pending reads on both ends
            self._outbox.put_nowait(("closed", reason))

    def _put(self, kind: str, item: Any) -> None:
        if self._link.closed_reason is not None:
            raise ChannelClosed(self._link.closed_reason)
        self._outbox.put_nowait((kind, item))

    async def _get(self, timeout_s: float | None) -> tuple[str, Any]:
        if self._link.closed_reason is not None and self._inbox.empty():
            raise ChannelClosed(self._link.closed_reason)
        async with asyncio.timeout(timeout_s):  # unlike 3.11's wait_for, never swallows a cancellation
            kind, item = await self._inbox.get()
        if kind == "closed":
            raise ChannelClosed(item)
        return kind, item


class LoopbackKVReceiver(KVReceiver):
    """Receives pushes from `LoopbackKVSender`s of this process at "loopback://NAME"."""

    def __init__(
        self,
        layout: KVLayout,
        handler: KVReceiveHandler,
        name: str,
        idle_timeout_s: float = 30.0,
        secret: TransferSecret | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if not name or "/" in name:
            raise ValueError(f"loopback receiver name must be non-empty without '/', got {name!r}")
        self.layout = layout
        self.address = SCHEME + name
        self._name = name
        self._inbound = InboundConnections(layout, handler, secret, handshake_timeout_s)
        self._idle_timeout_s = idle_timeout_s
        self._connections: dict[asyncio.Task[None], _LoopbackChannel] = {}

    async def start(self) -> None:
        if _RECEIVERS.get(self._name, self) is not self:
            raise ValueError(f"a loopback receiver named {self._name!r} is already started")
        _RECEIVERS[self._name] = self

    async def close(self, timeout_s: float = 5.0) -> None:
        """Leave the registry and drop every connection (in-progress requests fail)."""
        if _RECEIVERS.get(self._name) is self:
            del _RECEIVERS[self._name]
        for channel in self._connections.values():
            channel.close("receiver closed")
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=timeout_s)
            for task in pending:  # stuck in a handler call
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _accept(self, channel: _LoopbackChannel) -> None:
        """Serve a new connection (called by a sender's `open()`)."""
        peer = f"loopback sender #{next(_connection_ids)}"
        connection = self._inbound.new(peer, self.address)
        task = asyncio.get_running_loop().create_task(connection.serve(channel, self._idle_timeout_s))
        self._connections[task] = channel
        task.add_done_callback(self._connections.pop)


class LoopbackKVSender(PooledKVSender):
    """Pushes to `LoopbackKVReceiver`s of this process over pooled connections (see `pool.py`)."""

    def _check_address(self, address: str) -> None:
        if not address.startswith(SCHEME):
            raise ValueError(f"not a loopback address: {address!r}")

    async def _connect(self, address: str) -> Channel:
        receiver = _RECEIVERS.get(address[len(SCHEME) :])
        if receiver is None:
            raise TransferError(f"KV receiver {address} is unreachable: no loopback receiver by that name")
        mine, theirs = _LoopbackChannel.pair()
        receiver._accept(theirs)
        return mine
