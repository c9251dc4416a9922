"""One subscriber's shared output stream: the outputs of many requests, batched.

A decode step produces a token for every running request; sent as one gRPC message per request, a
batch of 256 costs the sender's event loop 256 writes a step (and the reader's 256 reads). Requests
that name a subscriber put their outputs here instead, and the subscriber's stream sends everything
that is due in one message per wake-up, as SGLang's and Dynamo's batched output links do. A request
whose outputs queued up meanwhile gets them merged, and after its first token an output is due once it
carries `stream_interval` tokens (or the end). The decode worker's StreamOutputs and the Router's
Subscribe streams are built on it (Subscribers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from baton.shared.engine.outputs import EngineOutput, merge_outputs

logger = logging.getLogger(__name__)


class Failed(NamedTuple):
    """A request that ended with an exception instead of a last output."""

    request_id: str
    error: BaseException


@dataclass
class _Sink:
    """One request's handle on the mux (what its producer puts outputs, or its exception, into)."""

    mux: OutputMux
    request_id: str

    def put_nowait(self, item: EngineOutput | BaseException) -> None:
        self.mux.put(self.request_id, item)


class OutputMux:
    def __init__(self, subscriber: str, stream_interval: int = 1) -> None:
        self.subscriber = subscriber
        self.stream_interval = stream_interval
        self.request_ids: set[str] = set()  # attached and not yet finished
        self.closed = False
        self._held: dict[str, EngineOutput | Failed] = {}  # not handed out yet (outputs merged)
        self._due: dict[str, None] = {}  # requests whose held item is due, in order
        self._started: set[str] = set()  # requests whose first output was handed out
        self._wake = asyncio.Event()

    def attach(self, request_id: str) -> _Sink:
        self.request_ids.add(request_id)
        return _Sink(self, request_id)

    def detach(self, request_id: str) -> None:
        """Forget a request that was never queued (it failed to start)."""
        self.request_ids.discard(request_id)
        self._held.pop(request_id, None)
        self._due.pop(request_id, None)

    def put(self, request_id: str, item: EngineOutput | BaseException) -> None:
        """Queue a request's output; an exception ends the request (what was held for it is dropped)."""
        if self.closed or request_id not in self.request_ids:
            return
        held = self._held.get(request_id)
        if isinstance(held, Failed) or (held is not None and held.finished):
            return
        if isinstance(item, BaseException):
            self._held[request_id] = Failed(request_id, item)
            self._due[request_id] = None
            self._wake.set()
            return
        held = self._held[request_id] = item if held is None else merge_outputs(held, item)
        if (
            held.finished
            or request_id not in self._started
            or len(held.new_token_ids) >= self.stream_interval
        ):
            self._due[request_id] = None
            self._wake.set()

    async def next_batch(self) -> list[EngineOutput | Failed]:
        """What is due, one item per request; waits until something is (or the mux closed: [])."""
        while not self._due and not self.closed:
            self._wake.clear()
            await self._wake.wait()
        due, self._due = list(self._due), {}
        batch = [self._held.pop(rid) for rid in due]
        for item in batch:
            rid = item.request_id
            self._started.add(rid)
            if isinstance(item, Failed) or item.finished:
                self.request_ids.discard(rid)
                self._started.discard(rid)
        return batch

    def close(self) -> set[str]:
        """Stop delivering; returns the requests still attached (the caller aborts them)."""
        self.closed = True
        self._wake.set()
        orphans, self.request_ids = self.request_ids, set()
        self._held.clear()
        self._due.clear()
        return orphans


_M = TypeVar("_M")


class Subscribers:
    """A server's open subscriber streams, one OutputMux each. Opening a stream again for the same
    subscriber ends the old one; a stream that ends hands its unfinished requests to `on_orphans`
    (which aborts them)."""

    def __init__(self, on_orphans: Callable[[set[str]], None], stream_interval: int = 1) -> None:
        self._on_orphans = on_orphans
        self._stream_interval = stream_interval
        self._muxes: dict[str, OutputMux] = {}

    def get(self, subscriber: str) -> OutputMux | None:
        return self._muxes.get(subscriber)

    async def stream(
        self, subscriber: str, opening: _M, render: Callable[[list[EngineOutput | Failed]], _M]
    ) -> AsyncIterator[_M]:
        """The subscriber's messages: `opening` (the subscription is in place once it is read), then
        one rendered batch per wake-up, until the stream is closed from either end."""
        if not subscriber:
            raise ValueError("subscriber must not be empty")
        previous = self._muxes.pop(subscriber, None)
        if previous is not None:
            logger.warning("subscriber %s opened a new output stream: ending its old one", subscriber)
            self._close(previous)
        mux = self._muxes[subscriber] = OutputMux(subscriber, self._stream_interval)
        logger.info("subscriber %s opened its output stream", subscriber)
        try:
            yield opening
            while True:
                batch = await mux.next_batch()
                if mux.closed:
                    return
                yield render(batch)
        finally:
            if self._muxes.get(subscriber) is mux:
                del self._muxes[subscriber]
            self._close(mux)

    def close_all(self) -> None:
        """End every stream (their requests go to `on_orphans`)."""
        muxes, self._muxes = list(self._muxes.values()), {}
        for mux in muxes:
            self._close(mux)

    def _close(self, mux: OutputMux) -> None:
        self._on_orphans(mux.close())
