"""The wire protocol every transport speaks, the push sessions, and the receiver's validation.

A connection (a `Channel`) carries small JSON messages and raw byte payloads, in order. The receiver
speaks first; after the handshake the connection carries many requests at once, every message
naming its request:

    sender                                            receiver
                                            <-        challenge {protocol, nonce}           once per
    hello {protocol, layout, address, nonce[, proof]} ->                                    connection
                                            <-        welcome [{proof}] | refused {reason}
    begin {request_id, block_ids, num_layers} ->      (no reply unless refused:)            per request
                                            <-        error {request_id, reason}
    layer {request_id, layer, count, nbytes} ->       then `nbytes` raw bytes               per run of
                                                                                            layers
    finish {request_id, trailer, checksums} ->
                                            <-        ack {request_id, payload} | nack {request_id, reason}
    abort {request_id, reason}              ->        (no reply; instead of finish)

The handshake authenticates both ends when they share a secret (`auth.py`: the proofs); a receiver
reads nothing but the hello, small and within `handshake_timeout_s`, until it welcomed the sender.
Nothing on a request's path waits for a round trip but its finish: a begin is not answered unless
it is refused (the refusal fails the sender's session at its next call, and the sender then aborts
the request), and a request that failed on the way (bad checksum, missing layer...) has its
remaining payloads received and dropped, so the connection stays in step; the reason travels back
in the nack. Each message's checksum travels in finish, so that both ends launch the reduction as a
message goes by and wait for the device once per request, not once per message. Anything that leaves
the stream out of step (a cut-short send, a protocol violation) closes the connection instead, and
every request on it fails on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from baton.shared.background import BackgroundTasks
from baton.shared.transfer.auth import TransferSecret, is_nonce, new_nonce
from baton.shared.transfer.base import (
    KVLayout,
    KVPushSession,
    KVReceiveHandler,
    PendingChecksum,
    TransferError,
    TransferRefused,
)
from baton.shared.transfer.faults import FaultInjector

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 4
MAX_MESSAGE_NBYTES = 16 << 20
"""Largest JSON message a transport accepts (a begin of 8192 blocks is ~50 KiB): a transport that
reads a message's size first refuses a larger one before allocating it."""
HANDSHAKE_MESSAGE_NBYTES = 64 << 10
"""Largest challenge or hello: what an end reads from a peer it has not authenticated yet."""


class ChannelClosed(TransferError):
    """The connection to the peer is gone (closed, reset, or the peer died)."""


class ProtocolError(TransferError):
    """The peer sent something the protocol does not allow; the connection is dropped."""


class Channel(ABC):
    """One ordered, bidirectional connection: small JSON messages and raw byte payloads."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @abstractmethod
    async def send_message(self, msg: dict[str, Any]) -> None:
        """Send one JSON-able message. Raises ChannelClosed."""

    @abstractmethod
    async def recv_message(
        self, timeout_s: float | None = None, max_nbytes: int = MAX_MESSAGE_NBYTES
    ) -> dict[str, Any]:
        """The next message (a dict with a str "type"). Raises ChannelClosed, ProtocolError (also for a
        message over `max_nbytes` encoded, refused before it is read), or asyncio.TimeoutError (after
        which the channel is out of step and must be closed)."""

    @abstractmethod
    async def send_payload(self, payload: torch.Tensor) -> None:
        """payload: [nbytes] uint8, contiguous; not read any more once this returns. Raises ChannelClosed."""

    @abstractmethod
    async def recv_payload(self, nbytes: int, timeout_s: float | None = None) -> torch.Tensor | None:
        """The next payload as [n] uint8 (n <= nbytes), or None if it was larger than nbytes (it is
        consumed and dropped). Valid until the call after next: before reusing a GPU buffer, the
        transport waits for the reads of it the caller queued on the current stream. Raises like
        `recv_message`."""

    @abstractmethod
    def close(self, reason: str) -> None:
        """Drop the connection now; idempotent. The peer's pending and later calls raise ChannelClosed."""

    def post(self, msg: dict[str, Any], payload: torch.Tensor | None = None) -> asyncio.Future[None]:
        """Queue a message, and its payload right behind it, for sending: posts go out in call order
        whoever awaits them, so concurrent senders need no lock, and a post whose waiter is cancelled
        still goes out whole. The future completes once both were sent (raises ChannelClosed).
        This default sends them in order from a task; a transport may post them at once."""
        if self._send_order is None:
            self._send_order = asyncio.Lock()
        return asyncio.get_running_loop().create_task(self._send_in_order(self._send_order, msg, payload))

    _send_order: asyncio.Lock | None = None

    async def _send_in_order(
        self, order: asyncio.Lock, msg: dict[str, Any], payload: torch.Tensor | None
    ) -> None:
        async with order:  # tasks start, and the lock admits them, first come first served
            await self.send_message(msg)
            if payload is not None:
                await self.send_payload(payload)


def encode_message(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_message(data: bytes | bytearray) -> dict[str, Any]:
    """Parse one message; anything but a JSON object with a str "type" raises ProtocolError."""
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"undecodable message: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f"message without a type: {str(msg)[:200]}")
    return msg


def check_request(layout: KVLayout, request_id: Any, block_ids: Any, num_layers: Any) -> str | None:
    """What is wrong with a request's announcement, or None. Shared by senders and receivers."""
    if not isinstance(request_id, str) or not request_id:
        return f"request_id must be a non-empty str, got {request_id!r}"
    if not isinstance(block_ids, list) or not block_ids:
        return "block_ids must be a non-empty list"
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in block_ids):
        return "block_ids must be ints >= 0"
    if len(set(block_ids)) != len(block_ids):
        return "block_ids has duplicates"
    if num_layers != layout.num_layers:
        return f"num_layers is {num_layers!r} but the layout has {layout.num_layers} layers"
    return None


def _field(msg: dict[str, Any], key: str, kind: type) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{msg['type']} message: field {key!r} is {value!r}, expected {kind.__name__}")
    return value


# -- sending side --------------------------------------------------------------------------------
async def handshake(
    channel: Channel, layout: KVLayout, address: str, timeout_s: float, secret: TransferSecret | None = None
) -> None:
    """Answer the receiver's challenge on a fresh connection to `address` (as dialled: the receiver's
    published address) with this sender's layout and, with a secret, its proof; check the receiver's
    proof in the welcome. TransferRefused if the receiver says no, TransferError if it cannot prove
    the secret or does not answer within `timeout_s`."""
    try:
        challenge = await channel.recv_message(timeout_s, HANDSHAKE_MESSAGE_NBYTES)
        receiver_nonce = _challenge_nonce(challenge, address)
        sender_nonce = new_nonce()
        hello = {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "layout": layout.to_dict(),
            "address": address,
            "nonce": sender_nonce,
        }
        if secret is not None:
            hello["proof"] = secret.proof("sender", receiver_nonce, sender_nonce, address)
        await channel.send_message(hello)
        reply = await channel.recv_message(timeout_s, HANDSHAKE_MESSAGE_NBYTES)
    except asyncio.TimeoutError:
        raise TransferError(f"no handshake from the receiver at {address} within {timeout_s:g} s") from None
    if reply["type"] == "refused":
        reason = reply.get("reason")
        raise TransferRefused(f"the decode worker at {address} refused the KV connection: {reason}")
    if reply["type"] != "welcome":
        raise ProtocolError(f"{address} answered the handshake with {reply['type']!r}")
    if secret is not None and not secret.verify(
        reply.get("proof"), "receiver", receiver_nonce, sender_nonce, address
    ):
        raise TransferError(
            f"the KV receiver at {address} did not prove the KV transfer secret: it is not the decode "
            "worker registered there, or a relay; nothing was pushed to it"
        )


def _challenge_nonce(challenge: dict[str, Any], address: str) -> str:
    """The receiver's nonce; TransferRefused for another protocol version, ProtocolError for junk."""
    if challenge["type"] != "challenge":
        raise ProtocolError(f"{address} opened the connection with {challenge['type']!r}, not a challenge")
    if challenge.get("protocol") != PROTOCOL_VERSION:
        raise TransferRefused(
            f"the decode worker at {address} speaks KV protocol {challenge.get('protocol')!r}, this "
            f"prefill worker {PROTOCOL_VERSION}: run the same Baton version on both"
        )
    nonce = challenge.get("nonce")
    if not is_nonce(nonce):
        raise ProtocolError(f"{address} sent a challenge without a valid nonce")
    return str(nonce)


class OutboundConnection:
    """A handshaken connection to one receiver, shared by every push session on it.

    Sends are serialized (a message and its payload stay together); a reader task hands each reply
    to the session it names. When the connection breaks, every session on it fails."""

    def __init__(self, channel: Channel, peer: str) -> None:
        self.channel = channel
        self.peer = peer
        self.sessions: dict[str, PushSession] = {}
        self._closed: str | None = None
        self._on_close: list[Callable[[OutboundConnection], None]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @property
    def closed(self) -> bool:
        return self._closed is not None or self.channel.closed

    def on_close(self, callback: Callable[[OutboundConnection], None]) -> None:
        """Call `callback(self)` once the connection is closed (at once if it already is)."""
        if self.closed:
            callback(self)
        else:
            self._on_close.append(callback)

    async def send(self, msg: dict[str, Any], payload: torch.Tensor | None = None) -> None:
        """Send a message (and its payload right behind it). Once posted it goes out whole, even if
        the caller is cancelled; a failed send closes the connection. Raises ChannelClosed."""
        await asyncio.shield(self.post(msg, payload))

    def post(self, msg: dict[str, Any], payload: torch.Tensor | None = None) -> asyncio.Future[None]:
        """Queue a message (and its payload) behind everything posted before, without waiting: posts
        made one after another, with no await between them, go out next to each other. The future
        completes once it was sent; a failed send closes the connection. Raises ChannelClosed."""
        if self.closed:
            raise ChannelClosed(self._closed or "connection closed")
        try:
            sending = self.channel.post(msg, payload)
        except ChannelClosed as e:
            self.close(f"sending failed: {e}")
            raise
        sending.add_done_callback(self._sent)
        return sending

    def _sent(self, sending: asyncio.Future[None]) -> None:
        error = None if sending.cancelled() else sending.exception()
        if sending.cancelled() or error is not None:
            self.close(f"sending failed: {error!r}")

    def close(self, reason: str) -> None:
        """Drop the connection; every session still on it fails with `reason`."""
        if self._closed is not None:
            return
        self._closed = reason
        self.channel.close(reason)
        self._reader.cancel()
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session.connection_lost(reason)
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)

    async def _read_replies(self) -> None:
        reason = "connection closed"
        try:
            while True:
                msg = await self.channel.recv_message()
                if msg["type"] not in ("error", "ack", "nack"):
                    raise ProtocolError(f"unexpected reply type {msg['type']!r}")
                session = self.sessions.get(_field(msg, "request_id", str))
                if session is not None:
                    session.on_reply(msg)
        except asyncio.CancelledError:
            return
        except TransferError as e:  # ChannelClosed, ProtocolError
            reason = str(e)
        except Exception as e:  # a bug here must not leave sessions waiting forever
            logger.exception("KV sender: reading replies from %s failed", self.peer)
            reason = f"sender error: {e!r}"
        self.close(f"connection to {self.peer} lost: {reason}")


class PushSession(KVPushSession):
    """A request's push over a shared connection. `release` is called once, when the session no
    longer needs a transfer slot: its finish was sent, or it ended."""

    def __init__(
        self,
        connection: OutboundConnection,
        layout: KVLayout,
        request_id: str,
        num_blocks: int,
        faults: FaultInjector,
        release: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._layout = layout
        self._peer = connection.peer
        self.request_id = request_id
        self._num_blocks = num_blocks
        self._faults = faults
        self._release: Callable[[], None] | None = release
        self._next_layer = 0
        self._finish_sent = False
        self._ended: str | None = None  # why the session can no longer be used
        self._finished = False  # ended by an ack (later use is a caller bug, not a transfer failure)
        self._reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.finish_timings: dict[str, float] = {}
        """Where the push spent its time, in ms, for logs: waiting for this end's checksums and for the
        reply, the receiver's own share of that reply (verifying, completing the handoff), and, as
        `*_at_ms` after `open`, when the finish left and when the receiver read the begin and the last
        payload (wall clocks: meaningful when both ends share a host's clock)."""
        self._checksums: list[PendingChecksum] = []  # of the layer messages sent, in order
        self._opened_at = time.time()  # wall clock, to place the receiver's reported times

    @classmethod
    async def open(
        cls,
        connection: OutboundConnection,
        layout: KVLayout,
        request_id: str,
        block_ids: list[int],
        faults: FaultInjector,
        release: Callable[[], None],
    ) -> PushSession:
        """Announce the request. The receiver answers only if it refuses it; the refusal then fails the
        session's next call."""
        if request_id in connection.sessions:
            raise ValueError(f"request {request_id!r} is already being pushed on this connection")
        session = cls(connection, layout, request_id, len(block_ids), faults, release)
        connection.sessions[request_id] = session
        begin = {
            "type": "begin",
            "request_id": request_id,
            "block_ids": block_ids,
            "num_layers": layout.num_layers,
        }
        try:
            await connection.send(begin)
        except BaseException as e:
            session._end(f"announcing the request: {e}")
            if isinstance(e, TransferError):
                raise TransferError(session._what_failed()) from e
            raise
        return session

    async def send_layers(self, first_layer: int, kv: torch.Tensor) -> None:
        message = await self._layers_message(first_layer, kv)
        if message is not None:
            await self._send(*message, f"sending layer {first_layer}")

    async def finish_with_layers(
        self,
        first_layer: int,
        kv: torch.Tensor,
        trailer: dict[str, Any],
        timeout_s: float = 30.0,
        on_sent: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """The last layers and the finish, posted next to each other once every checksum is known: the
        finish does not queue behind other requests' payloads, which a separate `finish` finds posted
        on the shared connection meanwhile, so the receiver completes the request as soon as the
        payload is in. This holds no reference to `kv` once it is sent, when `on_sent` is called."""
        _check_trailer(trailer)  # before anything goes out
        message = await self._layers_message(first_layer, kv)
        del kv
        finish, started, summed = await self._finish_message(trailer)
        what = "sending the last layers and the finish"
        try:
            posts = [] if message is None else [self._connection.post(*message)]
            posts.append(self._connection.post(finish))
        except TransferError as e:
            self._end(f"{what}: {e}", tell_receiver=False)
            raise type(e)(self._what_failed()) from e
        finally:
            message = None  # the posts hold the payload until it is sent
        for post in posts:
            await self._sent(post, what)
        if on_sent is not None:
            on_sent()
        return await self._verdict(started, summed, timeout_s)

    async def _layers_message(
        self, first_layer: int, kv: torch.Tensor
    ) -> tuple[dict[str, Any], torch.Tensor] | None:
        """The header and payload of a run of layers, its checksum started; None when the fault
        injector drops it (the receiver then misses a layer and refuses the finish)."""
        self._check_usable()
        if first_layer != self._next_layer:
            raise ValueError(f"layer {first_layer} sent out of order: expected layer {self._next_layer}")
        count = kv.shape[0] if kv.dim() else 0
        layer_shape = self._layout.layer_shape(self._num_blocks)
        left = self._layout.num_layers - first_layer
        if (
            tuple(kv.shape[1:]) != layer_shape
            or not 1 <= count <= left
            or kv.dtype != self._layout.torch_dtype
            or not kv.is_contiguous()
        ):
            raise ValueError(
                f"layers from {first_layer}: kv must be a contiguous {self._layout.dtype} tensor of shape "
                f"(count, {', '.join(map(str, layer_shape))}) with 1 <= count <= {left}, got "
                f"{tuple(kv.shape)} {kv.dtype} (contiguous={kv.is_contiguous()})"
            )
        await self._faults.delay()
        self._check_usable()
        self._next_layer += count
        if self._faults.should_drop():
            return None
        self._checksums.append(PendingChecksum.start(kv))
        payload = self._faults.maybe_corrupt(kv.reshape(-1).view(torch.uint8))  # payload: [nbytes]
        header = {
            "type": "layer",
            "request_id": self.request_id,
            "layer": first_layer,
            "count": count,
            "nbytes": payload.numel(),
        }
        return header, payload

    async def finish(self, trailer: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        finish, started, summed = await self._finish_message(trailer)
        await self._send(finish, None, "sending the finish")
        return await self._verdict(started, summed, timeout_s)

    async def _finish_message(self, trailer: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        """The finish message, with every message's checksum (waited for if the device has not
        produced them yet), and when the wait for them began and ended."""
        self._check_usable()
        _check_trailer(trailer)
        started = time.monotonic()
        checksums = await resolve_checksums(self._checksums)
        summed = time.monotonic()
        self._check_usable()  # refused or aborted while the sums were awaited
        finish = {"type": "finish", "request_id": self.request_id, "trailer": trailer, "checksums": checksums}
        return finish, started, summed

    async def _verdict(self, start: float, summed: float, timeout_s: float) -> dict[str, Any]:
        """After the finish was sent: free the transfer slot, wait for the receiver's reply."""
        finish_sent_at = time.time()
        self._finish_sent = True
        self._release_slot()
        try:
            reply = await asyncio.wait_for(asyncio.shield(self._reply), timeout_s)
        except asyncio.TimeoutError:
            self._end(f"no ack within {timeout_s:g} s")
            raise TransferError(self._what_failed()) from None
        self.finish_timings = {
            "checksums_ms": (summed - start) * 1e3,
            "reply_ms": (time.monotonic() - summed) * 1e3,
            "finish_sent_at_ms": (finish_sent_at - self._opened_at) * 1e3,
        }
        for key, value in (reply.get("timings") or {}).items():
            if not isinstance(value, (int, float)):
                continue
            if key.endswith("_at"):  # the receiver's wall clock: placed in ms after this open
                self.finish_timings[f"{key}_ms"] = (value - self._opened_at) * 1e3
            else:
                self.finish_timings[key] = value
        payload = reply.get("payload")
        if reply["type"] == "ack" and isinstance(payload, dict):
            self._finished = True
            self._end("finished", tell_receiver=False)
            return payload
        if reply["type"] in ("nack", "error"):
            self._end(f"rejected by {self._peer}: {reply.get('reason')}", tell_receiver=False)
            raise TransferError(self._what_failed())
        self._end(f"{self._peer} answered finish with {str(reply)[:200]}")
        raise ProtocolError(self._what_failed())

    async def abort(self, reason: str) -> None:
        if self._ended is not None:
            return
        self._end(f"aborted: {reason}", told=reason)
        await asyncio.sleep(0)  # let the abort message go out

    # -- called by the connection ---------------------------------------------------------------
    def on_reply(self, msg: dict[str, Any]) -> None:
        """A reply naming this request: a refusal (any time), or the verdict on its finish."""
        if msg["type"] == "error" and not self._finish_sent:
            self._end(f"refused by {self._peer}: {msg.get('reason')}")
        if not self._reply.done():
            self._reply.set_result(msg)

    def connection_lost(self, reason: str) -> None:
        self._end(reason, tell_receiver=False)

    # -- internals -------------------------------------------------------------------------------
    async def _send(self, msg: dict[str, Any], payload: torch.Tensor | None, what: str) -> None:
        try:
            sending = self._connection.post(msg, payload)
        except TransferError as e:
            self._end(f"{what}: {e}", tell_receiver=False)
            raise type(e)(self._what_failed()) from e
        await self._sent(sending, what)

    async def _sent(self, sending: asyncio.Future[None], what: str) -> None:
        """Wait for a posted message (it goes out whole even if this is cancelled)."""
        try:
            await asyncio.shield(sending)
        except TransferError as e:
            self._end(f"{what}: {e}", tell_receiver=False)
            raise type(e)(self._what_failed()) from e
        self._check_usable()  # refused while this message was in flight

    def _what_failed(self) -> str:
        return f"KV transfer of request {self.request_id!r} to {self._peer} failed: {self._ended}"

    def _check_usable(self) -> None:
        if self._ended is None:
            return
        if self._finished:
            raise RuntimeError(f"KV push session of request {self.request_id!r} already finished")
        raise TransferError(self._what_failed())

    def _release_slot(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _end(self, reason: str, tell_receiver: bool = True, told: str | None = None) -> None:
        """End the session once. Unless the receiver has already forgotten the request (it replied to
        its finish, or the connection is gone), an abort tells it to, with `told` (default: `reason`)."""
        if self._ended is not None:
            return
        self._ended = reason
        connection = self._connection
        if connection.sessions.get(self.request_id) is self:
            del connection.sessions[self.request_id]
        self._release_slot()
        if tell_receiver and not connection.closed:
            abort = {"type": "abort", "request_id": self.request_id, "reason": told or reason}
            _BACKGROUND.spawn(_send_quietly(connection, abort))


def _check_trailer(trailer: Any) -> None:
    """A finish's trailer is a JSON-able dict (TypeError/ValueError otherwise)."""
    if not isinstance(trailer, dict):
        raise ValueError(f"trailer must be a dict, got {type(trailer).__name__}")
    encode_message(trailer)


_BACKGROUND = BackgroundTasks()  # aborts on their way out


async def _send_quietly(connection: OutboundConnection, msg: dict[str, Any]) -> None:
    with contextlib.suppress(TransferError):
        await connection.send(msg)


# -- receiving side ------------------------------------------------------------------------------
@dataclass
class _Inbound:
    """A request being received on one connection."""

    request_id: str
    num_layers: int
    layer_shape: tuple[int, ...]
    layer_nbytes: int
    next_layer: int = 0
    failure: str | None = None  # set once failed: later payloads are drained, finish is nacked
    checksums: list[PendingChecksum] = field(default_factory=list)  # of the layer messages, in order
    message_layers: list[int] = field(default_factory=list)  # the first layer of each message
    handled_at: float = 0.0  # time.monotonic() when the last message was handled (for the ack's timings)
    handling_ms: float = 0.0  # how long handling the last message took once its payload arrived
    payload_ms: float = 0.0  # how long the last payload took to arrive once its header was read
    begun_at: float = field(default_factory=time.time)  # wall clock: when its begin was read
    payload_at: float = 0.0  # wall clock: when its last payload arrived


@dataclass
class InboundConnections:
    """What every connection of one receiver shares; `new` makes each accepted one."""

    layout: KVLayout
    handler: KVReceiveHandler
    secret: TransferSecret | None = None
    handshake_timeout_s: float = 10.0
    active_ids: set[str] = field(default_factory=set)
    """Requests being received, on any connection (a request id on at most one at a time)."""

    def new(self, peer: str, address: str) -> InboundConnection:
        """A connection from `peer` to the receiver published at `address`."""
        return InboundConnection(
            self.layout, self.handler, self.active_ids, peer, address, self.secret, self.handshake_timeout_s
        )


class InboundConnection:
    """One sender's connection as a receiver sees it: validates every message and drives the handler.

    Many requests may be in progress on one connection. Messages are read one after another; a
    finish is verified and completed in a task of its own, so the next request's messages are not
    held up by the handoff. `active_ids` is shared by all connections of one receiver, so a request
    id is received by at most one connection at a time. Until the handshake welcomed the sender (with
    `secret`: once it proved it), nothing but its hello is read and the handler is never called.
    """

    def __init__(
        self,
        layout: KVLayout,
        handler: KVReceiveHandler,
        active_ids: set[str],
        peer: str,
        address: str = "",
        secret: TransferSecret | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        """`address`: the receiver's published address, which senders prove their secret for."""
        self._layout = layout
        self._handler = handler
        self._active_ids = active_ids
        self.peer = peer
        self._address = address
        self._secret = secret
        self._handshake_timeout_s = handshake_timeout_s
        self.requests: dict[str, _Inbound] = {}
        self._finishing = BackgroundTasks()

    async def serve(self, channel: Channel, idle_timeout_s: float) -> None:
        """Handle the connection until it closes; when requests are in progress and nothing arrives
        for `idle_timeout_s`, they fail. Never raises (but for cancellation); always closes the channel."""
        try:
            await self._serve(channel, idle_timeout_s)
        except ChannelClosed as e:
            self.fail_active(f"connection lost: {e}")
        except asyncio.TimeoutError:
            self.fail_active(f"timed out: nothing from the sender for {idle_timeout_s:g} s")
        except ProtocolError as e:
            logger.warning("KV receiver: protocol error from %s, dropping the connection: %s", self.peer, e)
            self.fail_active(f"protocol error: {e}")
        except Exception as e:  # a receiver bug: fail this connection's requests, keep the receiver alive
            logger.exception("KV receiver: unexpected error serving %s", self.peer)
            self.fail_active(f"receiver error: {e!r}")
        finally:
            self.fail_active("connection closed")
            channel.close("receiver dropped the connection")
            await self._finishing.wait()  # their replies find the channel closed; let their handoffs end

    async def _serve(self, channel: Channel, idle_timeout_s: float) -> None:
        if not await self._handshake(channel):
            return
        while True:
            timeout_s = idle_timeout_s if self.requests else None
            msg = await channel.recv_message(timeout_s)
            kind = msg["type"]
            request_id = _field(msg, "request_id", str)
            if kind == "begin":
                refusal = await self.on_begin(msg)
                if refusal is not None:
                    await self._reply(channel, refusal)
            elif kind == "layer":
                await self._on_layer(request_id, msg, channel, idle_timeout_s)
            elif kind == "finish":
                self._on_finish(request_id, msg, channel)
            elif kind == "abort":
                self.on_abort(request_id, msg)
            else:
                raise ProtocolError(f"unexpected message type {kind!r}")

    async def _handshake(self, channel: Channel) -> bool:
        """Challenge the sender and welcome it or refuse it (logged). False: the connection is to be
        closed, with nothing but the hello read from it."""
        nonce = new_nonce()
        try:
            await channel.send_message({"type": "challenge", "protocol": PROTOCOL_VERSION, "nonce": nonce})
            hello = await channel.recv_message(self._handshake_timeout_s, HANDSHAKE_MESSAGE_NBYTES)
            reply = self.on_hello(hello, nonce)
            await channel.send_message(reply)
        except asyncio.TimeoutError:
            self._log_refusal(f"no hello within the handshake timeout ({self._handshake_timeout_s:g} s)")
            return False
        except ProtocolError as e:
            self._log_refusal(f"not a hello: {e}")
            return False
        except ChannelClosed as e:
            logger.info("KV receiver: %s hung up before the handshake: %s", self.peer, e)
            return False
        if reply["type"] == "welcome":
            return True
        self._log_refusal(reply["reason"])
        with contextlib.suppress(asyncio.TimeoutError):  # let the sender read the refusal and hang up
            await channel.recv_message(min(self._handshake_timeout_s, 5.0), HANDSHAKE_MESSAGE_NBYTES)
        return False

    def _log_refusal(self, reason: str) -> None:
        logger.warning("KV receiver: refused %s: %s", self.peer, reason)

    def on_hello(self, msg: dict[str, Any], nonce: str) -> dict[str, Any]:
        """The welcome or refusal of a hello answering the challenge `nonce`."""
        if msg["type"] != "hello":
            raise ProtocolError(f"expected hello, got {msg['type']!r}")
        if msg.get("protocol") != PROTOCOL_VERSION:
            return _refused(f"protocol version {msg.get('protocol')!r}, receiver speaks {PROTOCOL_VERSION}")
        sender_nonce: Any = msg.get("nonce")
        address: Any = msg.get("address")
        if is_nonce(sender_nonce) and isinstance(address, str):
            problem = self._authentication_problem(msg.get("proof"), nonce, sender_nonce, address)
        else:
            problem = "the hello lacks the sender's nonce or the address it dialled"
        if problem is not None:
            return _refused(problem)
        layout: Any = msg.get("layout")
        try:
            theirs = KVLayout.from_dict(layout)
        except (TypeError, ValueError) as e:
            return _refused(f"bad KV layout: {e}")
        diff = self._layout.mismatch(theirs)
        if diff is not None:
            return _refused(f"KV layout mismatch (receiver vs sender): {diff}")
        if self._secret is None:
            return {"type": "welcome"}
        return {"type": "welcome", "proof": self._secret.proof("receiver", nonce, sender_nonce, address)}

    def _authentication_problem(self, proof: Any, nonce: str, sender_nonce: str, address: str) -> str | None:
        """Why the sender's proof (None: it sent none) does not authenticate it, or None."""
        secret = self._secret
        if secret is None:
            if proof is None:
                return None
            return (
                "KV transfer secret mismatch: the sender proves a --kv-transfer-secret, this receiver has "
                "none (set the same one on every prefill and decode worker, or on none)"
            )
        if proof is None:
            return (
                "authentication failed: no proof of the KV transfer secret, which this receiver requires "
                "(the sender has no --kv-transfer-secret)"
            )
        if address != self._address:
            dialled, own = address[:200], self._address
            return f"authentication failed: the sender dialled {dialled!r}, this receiver is {own!r}"
        if not secret.verify(proof, "sender", nonce, sender_nonce, address):
            return "authentication failed: wrong proof of the KV transfer secret (the secrets differ)"
        return None

    async def on_begin(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Start receiving a request; the error reply if it is refused (its payloads are then drained)."""
        request_id: str = msg["request_id"]
        if request_id in self.requests:
            raise ProtocolError(f"begin of request {request_id!r} while it is in progress")
        block_ids: Any = msg.get("block_ids")
        num_layers: Any = msg.get("num_layers")
        problem = check_request(self._layout, request_id, block_ids, num_layers)
        if problem is not None and not isinstance(block_ids, list):
            raise ProtocolError(f"begin of request {request_id!r}: {problem}")  # its payloads can't be sized
        num_blocks = len(block_ids)
        shape, nbytes = self._layout.layer_shape(num_blocks), self._layout.layer_nbytes(num_blocks)
        request = _Inbound(request_id, self._layout.num_layers, shape, nbytes)
        self.requests[request_id] = request
        if problem is None and request_id in self._active_ids:
            problem = f"request {request_id!r} is already being received"
        if problem is None:
            try:
                await self._handler.begin(request_id, list(block_ids), num_layers)
            except TransferError as e:
                problem = str(e)
            except Exception as e:
                logger.exception("KV receive handler begin(%r) raised", request_id)
                problem = f"receiver error: {e!r}"
        if problem is not None:
            request.failure = problem  # never begun: no handler.fail
            return {"type": "error", "request_id": request_id, "reason": problem}
        self._active_ids.add(request_id)
        return None

    async def _on_layer(
        self, request_id: str, msg: dict[str, Any], channel: Channel, idle_timeout_s: float
    ) -> None:
        request = self.requests.get(request_id)
        if request is None:
            raise ProtocolError(f"layer message for request {request_id!r}, which was not begun here")
        layer, nbytes = _field(msg, "layer", int), _field(msg, "nbytes", int)
        count = _field(msg, "count", int)
        problem = self._check_header(request, layer, count, nbytes)
        # post the size the header announces (a transport may hand back the whole posted buffer), or
        # what is left of the request if the header is wrong (the payload is then drained)
        posted = (
            nbytes
            if problem is None
            else request.layer_nbytes * max(1, request.num_layers - request.next_layer)
        )
        posting = time.monotonic()
        payload = await channel.recv_payload(posted, idle_timeout_s)  # payload: [<= posted]
        received = time.monotonic()
        request.payload_ms = (received - posting) * 1e3
        request.payload_at = time.time()
        if request.failure is not None:
            return  # drained
        if problem is None and payload is None:
            problem = f"layer {layer}: payload is larger than the {nbytes} bytes announced"
        elif problem is None and payload is not None and payload.numel() != nbytes:
            problem = f"layer {layer}: payload is {payload.numel()} bytes, {nbytes} announced"
        if problem is not None or payload is None:
            self._fail(request, problem or "no payload")
            return
        request.checksums.append(PendingChecksum.start(payload))
        request.message_layers.append(layer)
        # kv: [count, 2, num_blocks, block_size, kv_heads, head_dim]
        kv = payload.view(self._layout.torch_dtype).view(count, *request.layer_shape)
        try:
            self._handler.write_layers(request.request_id, layer, kv)
        except TransferError as e:
            self._fail(request, f"layer {layer}: {e}")
            return
        except Exception as e:
            logger.exception("KV receive handler write_layers(%r, %d) raised", request.request_id, layer)
            self._fail(request, f"layer {layer}: receiver error: {e!r}")
            return
        request.next_layer += count
        request.handled_at = time.monotonic()
        request.handling_ms = (request.handled_at - received) * 1e3

    @staticmethod
    def _check_header(request: _Inbound, layer: int, count: int, nbytes: int) -> str | None:
        expected, total = request.next_layer, request.num_layers
        if layer >= total:
            return f"layer {layer} out of range (the request has {total} layers)"
        if count < 1 or layer + count > total:
            return f"layers {layer} to {layer + count - 1} out of range (the request has {total} layers)"
        if layer > expected:
            return f"layer {expected} missing: layer {layer} arrived instead"
        if layer < expected:
            return f"layer {layer} arrived again or out of order (expected layer {expected})"
        if nbytes != count * request.layer_nbytes:
            return f"layer {layer}: header says {nbytes} bytes, expected {count * request.layer_nbytes}"
        return None

    def _on_finish(self, request_id: str, msg: dict[str, Any], channel: Channel) -> None:
        self._finishing.spawn(self._finish(request_id, msg, channel))

    async def _finish(self, request_id: str, msg: dict[str, Any], channel: Channel) -> None:
        with contextlib.suppress(ChannelClosed):  # the sender is gone; it learns nothing more
            await self._reply(channel, {"request_id": request_id, **await self.on_finish(request_id, msg)})

    async def on_finish(self, request_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Verify and complete a request; the ack or nack (without its request id)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return {"type": "nack", "reason": f"finish of request {request_id!r}, which was not begun here"}
        if request.failure is not None:
            return {"type": "nack", "reason": request.failure}
        start = time.monotonic()
        try:
            await self._verify_checksums(request, msg.get("checksums"))
            verified = time.monotonic()
            payload = await self._complete(request, msg.get("trailer"))
        except TransferError as e:
            self._fail(request, str(e))
            return {"type": "nack", "reason": str(e)}
        self._active_ids.discard(request.request_id)
        timings = {
            "last_payload_ms": request.payload_ms,  # the last payload's arrival after its header
            "last_message_ms": request.handling_ms,  # handling the last payload, once it arrived
            "finish_arrived_ms": (start - request.handled_at) * 1e3,  # then until the finish arrived
            "verify_ms": (verified - start) * 1e3,
            "complete_ms": (time.monotonic() - verified) * 1e3,
            "begun_at": request.begun_at,  # wall clock: the sender places these on its own timeline
            "payload_at": request.payload_at,
        }
        return {"type": "ack", "payload": payload, "timings": timings}

    @staticmethod
    async def _reply(channel: Channel, msg: dict[str, Any]) -> None:
        await asyncio.shield(channel.post(msg))  # the reader's refusals and the finish tasks' verdicts

    @staticmethod
    async def _verify_checksums(request: _Inbound, sent: Any) -> None:
        """The sender's per-message checksums against what arrived; TransferError naming the first bad
        message by its first layer."""
        if request.next_layer < request.num_layers:
            n, total = request.next_layer, request.num_layers
            raise TransferError(f"finish after {n} of {total} layers: layer {n} missing")
        wanted = len(request.checksums)
        if not isinstance(sent, list) or len(sent) != wanted:
            raise TransferError(
                f"finish must carry {wanted} checksums (one a message), got {str(sent)[:100]}"
            )
        received = await resolve_checksums(request.checksums)
        for first, theirs, ours in zip(request.message_layers, sent, received, strict=True):
            if theirs != ours:
                shown = f"{theirs:#018x}" if isinstance(theirs, int) else repr(theirs)[:40]
                raise TransferError(f"layer {first}: checksum mismatch (sent {shown}, received {ours:#018x})")

    async def _complete(self, request: _Inbound, trailer: Any) -> dict[str, Any]:
        """Let the handler complete a verified request; every failure is a TransferError."""
        if not isinstance(trailer, dict):
            raise TransferError(f"trailer must be a dict, got {type(trailer).__name__}")
        try:
            payload = await self._handler.complete(request.request_id, trailer)
            encode_message({"payload": payload})
        except TransferError:
            raise
        except Exception as e:
            logger.exception("KV receive handler complete(%r) failed", request.request_id)
            raise TransferError(f"receiver error: {e!r}") from e
        if not isinstance(payload, dict):
            raise TransferError(f"receiver error: ack payload must be a dict, got {type(payload).__name__}")
        return payload

    def on_abort(self, request_id: str, msg: dict[str, Any]) -> None:
        request = self.requests.pop(request_id, None)  # unknown: already finished or never begun
        if request is not None and request.failure is None:
            self._fail(request, f"aborted by the sender: {msg.get('reason')}")

    def fail_active(self, reason: str) -> None:
        """Fail every request in progress (a disconnect, timeout or shutdown)."""
        requests, self.requests = list(self.requests.values()), {}
        for request in requests:
            if request.failure is None:
                self._fail(request, reason)

    def _fail(self, request: _Inbound, reason: str) -> None:
        request.failure = reason
        self._active_ids.discard(request.request_id)
        logger.warning("KV transfer of %r from %s failed: %s", request.request_id, self.peer, reason)
        try:
            self._handler.fail(request.request_id, reason)
        except Exception:
            logger.exception("KV receive handler fail(%r) raised", request.request_id)


def _refused(reason: str) -> dict[str, Any]:
    return {"type": "refused", "reason": reason}


async def resolve_checksums(pending: list[PendingChecksum]) -> list[int]:
    """The checksums' values; if a GPU's sums have not landed yet, they are awaited off the event loop
    (the device may be busy for a while)."""
    if not all(p.landed for p in pending):
        await asyncio.to_thread(PendingChecksum.wait_all, pending)
    return PendingChecksum.values(pending)
