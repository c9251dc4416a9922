"""The wire protocol every transport speaks, the push session, and the receiver's validation.

A connection (a `Channel`) carries small JSON messages and raw byte payloads, in order:

    sender                                          receiver
    hello {protocol, layout}              ->                                          once per
                                          <-        welcome | refused {reason}        connection
    begin {request_id, block_ids, num_layers} ->
                                          <-        ready | error {reason}            per request
    layer {layer, count, nbytes}          ->        then `nbytes` raw bytes           per run of
                                                                                      layers
    finish {trailer, checksums}           ->
                                          <-        ack {payload} | nack {reason}
    abort {reason}                        ->        (no reply; instead of finish)

A connection carries one request at a time and then the next. Between begin's reply and finish the
receiver never replies: a request that failed (bad checksum, missing layer...) is drained, its
remaining payloads received and dropped, so the connection stays in step; the reason travels back
in the nack. Each message's checksum travels in finish, so that both ends launch the reduction as a
message goes by and wait for the device once per request, not once per message. Anything that leaves
the stream out of step (a timeout, a cancelled send, a protocol violation) closes the connection
instead, and the peer sees a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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

PROTOCOL_VERSION = 2


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
    async def recv_message(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next message (a dict with a str "type"). Raises ChannelClosed, ProtocolError, or
        asyncio.TimeoutError (after which the channel is out of step and must be closed)."""

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
ReleaseChannel = Callable[[Channel, bool], None]  # (channel, still_in_step) -> None; called once


async def handshake(channel: Channel, layout: KVLayout, peer: str, timeout_s: float) -> None:
    """Introduce this sender's layout on a fresh connection; TransferRefused if the receiver says no."""
    try:
        hello = {"type": "hello", "protocol": PROTOCOL_VERSION, "layout": layout.to_dict()}
        await channel.send_message(hello)
        reply = await channel.recv_message(timeout_s)
    except asyncio.TimeoutError:
        raise TransferError(f"no handshake reply from {peer} within {timeout_s:g} s") from None
    if reply["type"] == "refused":
        raise TransferRefused(f"{peer} refused the connection: {reply.get('reason')}")
    if reply["type"] != "welcome":
        raise ProtocolError(f"{peer} answered the handshake with {reply['type']!r}")


class PushSession(KVPushSession):
    """A request's push over one channel; hands the channel back through `release` when done."""

    def __init__(
        self,
        channel: Channel,
        layout: KVLayout,
        peer: str,
        request_id: str,
        num_blocks: int,
        faults: FaultInjector,
        release: ReleaseChannel,
    ) -> None:
        self._channel = channel
        self._layout = layout
        self._peer = peer
        self.request_id = request_id
        self._num_blocks = num_blocks
        self._faults = faults
        self._release = release
        self._next_layer = 0
        self._busy = False  # a message exchange is in progress
        self._ended: str | None = None  # why the session can no longer be used
        self._finished = False  # ended by an ack (later use is a caller bug, not a transfer failure)
        self.finish_timings: dict[str, float] = {}
        """Where `finish` spent its time, in ms: waiting for this end's checksums, for the reply, and the
        receiver's own share of that reply (verifying, completing the handoff), for logs."""
        self._checksums: list[PendingChecksum] = []  # of the layer messages sent, in order

    @classmethod
    async def open(
        cls,
        channel: Channel,
        layout: KVLayout,
        peer: str,
        request_id: str,
        block_ids: list[int],
        faults: FaultInjector,
        release: ReleaseChannel,
        timeout_s: float,
    ) -> PushSession:
        """Announce the request on a handshaken channel; TransferError if the receiver refuses it."""
        session = cls(channel, layout, peer, request_id, len(block_ids), faults, release)
        begin = {
            "type": "begin",
            "request_id": request_id,
            "block_ids": block_ids,
            "num_layers": layout.num_layers,
        }
        async with session._exchange("announcing the request"):
            await channel.send_message(begin)
            reply = await channel.recv_message(timeout_s)
        if reply["type"] == "ready":
            return session
        if reply["type"] == "error":
            session._end(f"refused by {peer}: {reply.get('reason')}", in_step=True)
            raise TransferError(session._what_failed())
        session._end(f"{peer} answered begin with {reply['type']!r}", in_step=False)
        raise ProtocolError(session._what_failed())

    async def send_layers(self, first_layer: int, kv: torch.Tensor) -> None:
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
            return
        self._checksums.append(PendingChecksum.start(kv))
        payload = self._faults.maybe_corrupt(kv.reshape(-1).view(torch.uint8))  # payload: [nbytes]
        header = {"type": "layer", "layer": first_layer, "count": count, "nbytes": payload.numel()}
        async with self._exchange(f"sending layer {first_layer}"):
            await self._channel.send_message(header)
            await self._channel.send_payload(payload)

    async def finish(self, trailer: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        self._check_usable()
        if not isinstance(trailer, dict):
            raise ValueError(f"trailer must be a dict, got {type(trailer).__name__}")
        encode_message(trailer)  # not JSON-able: TypeError/ValueError before anything is sent
        async with self._exchange("waiting for the receiver's ack"):
            start = time.monotonic()
            checksums = await resolve_checksums(self._checksums)
            summed = time.monotonic()
            await self._channel.send_message({"type": "finish", "trailer": trailer, "checksums": checksums})
            reply = await self._channel.recv_message(timeout_s)
        self.finish_timings = {
            "checksums_ms": (summed - start) * 1e3,
            "reply_ms": (time.monotonic() - summed) * 1e3,
            **{k: v for k, v in (reply.get("timings") or {}).items() if isinstance(v, (int, float))},
        }
        payload = reply.get("payload")
        if reply["type"] == "ack" and isinstance(payload, dict):
            self._finished = True
            self._end("finished", in_step=True)
            return payload
        if reply["type"] == "nack":
            self._end(f"rejected by {self._peer}: {reply.get('reason')}", in_step=True)
            raise TransferError(self._what_failed())
        self._end(f"{self._peer} answered finish with {str(reply)[:200]}", in_step=False)
        raise ProtocolError(self._what_failed())

    async def abort(self, reason: str) -> None:
        if self._ended is not None:
            return
        if self._busy or self._channel.closed:  # mid-message: only a disconnect tells the receiver
            self._end(f"aborted: {reason}", in_step=False)
            return
        self._busy = True
        sent = False
        try:
            await self._channel.send_message({"type": "abort", "reason": reason})
            sent = True
        except ChannelClosed:
            logger.debug("abort of %s: channel to %s already closed", self.request_id, self._peer)
        finally:
            self._busy = False
            if self._ended is None:
                self._end(f"aborted: {reason}", in_step=sent)

    # -- internals -------------------------------------------------------------------------------
    def _what_failed(self) -> str:
        return f"KV transfer of request {self.request_id!r} to {self._peer} failed: {self._ended}"

    def _check_usable(self) -> None:
        if self._ended is None:
            return
        if self._finished:
            raise RuntimeError(f"KV push session of request {self.request_id!r} already finished")
        raise TransferError(self._what_failed())

    def _end(self, reason: str, in_step: bool) -> None:
        """End the session once; the channel goes back in step (reusable) or is closed."""
        if self._ended is not None:
            return
        self._ended = reason
        self._release(self._channel, in_step and not self._channel.closed)

    @contextlib.asynccontextmanager
    async def _exchange(self, what: str) -> AsyncIterator[None]:
        """Run one message exchange; any way out but success ends the session with the channel dropped
        (a cancelled or timed-out exchange leaves the stream out of step)."""
        self._busy = True
        done = False
        try:
            yield
            done = True
        except asyncio.TimeoutError:
            self._end(f"timed out {what}", in_step=False)
            raise TransferError(self._what_failed()) from None
        except TransferError as e:  # ChannelClosed, ProtocolError: keep the class for the caller
            self._end(f"{what}: {e}", in_step=False)
            raise type(e)(self._what_failed()) from e
        finally:
            self._busy = False
            if not done:
                self._end(f"interrupted while {what}", in_step=False)


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


class InboundConnection:
    """One sender's connection as a receiver sees it: validates every message and drives the handler.

    `active_ids` is shared by all connections of one receiver, so a request id is received by at
    most one connection at a time.
    """

    def __init__(self, layout: KVLayout, handler: KVReceiveHandler, active_ids: set[str], peer: str) -> None:
        self._layout = layout
        self._handler = handler
        self._active_ids = active_ids
        self.peer = peer
        self.request: _Inbound | None = None

    async def serve(self, channel: Channel, idle_timeout_s: float) -> None:
        """Handle the connection until it closes; a started request that goes `idle_timeout_s`
        without a message fails. Never raises (but for cancellation); always closes the channel."""
        try:
            await self._serve(channel, idle_timeout_s)
        except ChannelClosed as e:
            self.fail_active(f"connection lost: {e}")
        except asyncio.TimeoutError:
            self.fail_active(f"timed out: nothing from the sender for {idle_timeout_s:g} s")
        except ProtocolError as e:
            logger.warning("KV receiver: protocol error from %s, dropping the connection: %s", self.peer, e)
            self.fail_active(f"protocol error: {e}")
        except Exception as e:  # a receiver bug: fail this connection's request, keep the receiver alive
            logger.exception("KV receiver: unexpected error serving %s", self.peer)
            self.fail_active(f"receiver error: {e!r}")
        finally:
            self.fail_active("connection closed")
            channel.close("receiver dropped the connection")

    async def _serve(self, channel: Channel, idle_timeout_s: float) -> None:
        reply = self.on_hello(await channel.recv_message(idle_timeout_s))
        await channel.send_message(reply)
        if reply["type"] != "welcome":
            with contextlib.suppress(asyncio.TimeoutError):  # let the sender read it and hang up
                await channel.recv_message(min(idle_timeout_s, 5.0))
            return
        while True:
            timeout_s = idle_timeout_s if self.request is not None else None
            msg = await channel.recv_message(timeout_s)
            kind = msg["type"]
            if kind == "begin":
                await channel.send_message(self.on_begin(msg))
            elif kind == "layer":
                await self._on_layer(msg, channel, idle_timeout_s)
            elif kind == "finish":
                await channel.send_message(await self.on_finish(msg))
            elif kind == "abort":
                self.on_abort(msg)
            else:
                raise ProtocolError(f"unexpected message type {kind!r}")

    def on_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["type"] != "hello":
            raise ProtocolError(f"expected hello, got {msg['type']!r}")
        if msg.get("protocol") != PROTOCOL_VERSION:
            return _refused(f"protocol version {msg.get('protocol')!r}, receiver speaks {PROTOCOL_VERSION}")
        layout: Any = msg.get("layout")
        try:
            theirs = KVLayout.from_dict(layout)
        except (TypeError, ValueError) as e:
            return _refused(f"bad KV layout: {e}")
        diff = self._layout.mismatch(theirs)
        if diff is not None:
            return _refused(f"KV layout mismatch (receiver vs sender): {diff}")
        return {"type": "welcome"}

    def on_begin(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.request is not None:
            raise ProtocolError(f"begin while request {self.request.request_id!r} is in progress")
        request_id: Any = msg.get("request_id")
        block_ids: Any = msg.get("block_ids")
        num_layers: Any = msg.get("num_layers")
        problem = check_request(self._layout, request_id, block_ids, num_layers)
        if problem is None and request_id in self._active_ids:
            problem = f"request {request_id!r} is already being received"
        if problem is not None:
            return {"type": "error", "reason": problem}
        try:
            self._handler.begin(request_id, list(block_ids), num_layers)
        except TransferError as e:
            return {"type": "error", "reason": str(e)}
        except Exception as e:
            logger.exception("KV receive handler begin(%r) raised", request_id)
            return {"type": "error", "reason": f"receiver error: {e!r}"}
        num_blocks = len(block_ids)
        shape, nbytes = self._layout.layer_shape(num_blocks), self._layout.layer_nbytes(num_blocks)
        self.request = _Inbound(request_id, num_layers, shape, nbytes)
        self._active_ids.add(request_id)
        return {"type": "ready"}

    async def _on_layer(self, msg: dict[str, Any], channel: Channel, idle_timeout_s: float) -> None:
        request = self.request
        if request is None:
            raise ProtocolError("layer message outside a request")
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
        payload = await channel.recv_payload(posted, idle_timeout_s)  # payload: [<= posted]
        received = time.monotonic()
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
        for i in range(count):
            try:
                self._handler.write_layer(request.request_id, layer + i, kv[i])
            except TransferError as e:
                self._fail(request, f"layer {layer + i}: {e}")
                return
            except Exception as e:
                logger.exception(
                    "KV receive handler write_layer(%r, %d) raised", request.request_id, layer + i
                )
                self._fail(request, f"layer {layer + i}: receiver error: {e!r}")
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

    async def on_finish(self, msg: dict[str, Any]) -> dict[str, Any]:
        request, self.request = self.request, None
        if request is None:
            return {"type": "nack", "reason": "finish without a request in progress"}
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
            "last_message_ms": request.handling_ms,  # handling the last payload, once it arrived
            "finish_arrived_ms": (start - request.handled_at) * 1e3,  # then until the finish arrived
            "verify_ms": (verified - start) * 1e3,
            "complete_ms": (time.monotonic() - verified) * 1e3,
        }
        return {"type": "ack", "payload": payload, "timings": timings}

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

    def on_abort(self, msg: dict[str, Any]) -> None:
        request, self.request = self.request, None
        if request is not None and request.failure is None:
            self._fail(request, f"aborted by the sender: {msg.get('reason')}")

    def fail_active(self, reason: str) -> None:
        """Fail the request in progress, if any (a disconnect, timeout or shutdown)."""
        request, self.request = self.request, None
        if request is not None and request.failure is None:
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
