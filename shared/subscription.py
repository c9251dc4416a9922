"""The reading end of a shared output stream (a decode worker's StreamOutputs, the Router's
Subscribe): one gRPC stream carries the pieces of many requests; they are demultiplexed here by
request id into per-request queues, and a reader that fell behind gets its queued pieces merged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

import grpc

from baton.shared.engine.outputs import merge_pending

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0

T = TypeVar("T")


class StreamLost(Exception):
    """The shared stream ended: every request on it lost its pieces."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An AioRpcError made here, for failures a caller handles like the server's own statuses."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Subscription(Generic[T]):
    """One shared stream, opened on first use and again after it ended.

    `open_stream` starts the call; the server's first message (possibly empty) confirms the
    subscription. `split` turns each message into (request id, piece or exception) pairs."""

    def __init__(
        self,
        name: str,
        open_stream: Callable[[], Any],
        split: Callable[[Any], Iterable[tuple[str, T | BaseException]]],
        merge: Callable[[T, T], T],
        is_last: Callable[[T], bool],
    ) -> None:
        self.name = name
        self._open_stream = open_stream
        self._split = split
        self._merge = merge
        self._is_last = is_last
        self._queues: dict[str, asyncio.Queue[T | BaseException]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Subscribe if not subscribed (AioRpcError if the server refuses or does not answer in time)."""
        if self._reader is None or self._reader.done():
            self._opened = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._read())
        assert self._opened is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), OPEN_TIMEOUT_S)
        except TimeoutError:
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE, f"{self.name} did not open within {OPEN_TIMEOUT_S:.0f} s"
            ) from None

    def attach(self, request_id: str) -> AsyncIterator[T]:
        """The request's pieces, merged when several queued up; attach before the request starts.
        ValueError if the id is attached already."""
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        queue: asyncio.Queue[T | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return self._pieces(queue)

    def detach(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _pieces(self, queue: asyncio.Queue[T | BaseException]) -> AsyncIterator[T]:
        while True:
            item = await queue.get()
            if isinstance(item, StreamLost):
                raise item.error
            if isinstance(item, BaseException):
                raise item
            piece = merge_pending(queue, item, self._merge, self._is_last)
            yield piece
            if self._is_last(piece):
                return

    async def _read(self) -> None:
        opened = self._opened
        assert opened is not None
        call = self._open_stream()
        try:
            async for message in call:
                if not opened.done():
                    opened.set_result(None)
                for request_id, piece in self._split(message):
                    queue = self._queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(piece)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.name} ended")
        except grpc.aio.AioRpcError as exc:
            logger.warning("%s ended: %s", self.name, exc.details())
            lost = StreamLost(exc)
            if not opened.done():
                opened.set_exception(exc)
            queues, self._queues = self._queues, {}
            for queue in queues.values():
                queue.put_nowait(lost)
        finally:
            call.cancel()
