"""The router's end of a decode worker's StreamOutputs stream: one stream per decode worker carries
the outputs of every request this router placed there, demultiplexed here to the attempts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from baton.shared.engine.outputs import EngineOutput, merge_queued
from baton.shared.rpc import worker_pb2
from baton.shared.rpc_convert import output_from_delta

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0


class StreamLost(Exception):
    """The shared stream ended: every attempt on it lost its outputs."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class DecodeOutputs:
    def __init__(self, stub: Any, subscriber: str, worker_id: str) -> None:
        self._stub = stub
        self._subscriber = subscriber
        self.worker_id = worker_id
        self._queues: dict[str, asyncio.Queue[EngineOutput | BaseException]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Subscribe if not subscribed (AioRpcError if the worker refuses or does not answer)."""
        if self._reader is None or self._reader.done():
            self._opened = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._read())
        assert self._opened is not None
        await asyncio.wait_for(asyncio.shield(self._opened), OPEN_TIMEOUT_S)

    def attach(self, attempt_id: str) -> AsyncIterator[EngineOutput]:
        """The attempt's outputs, merged when several queued up; attach before Reserve."""
        queue = self._queues[attempt_id] = asyncio.Queue()
        return self._outputs(queue)

    def detach(self, attempt_id: str) -> None:
        self._queues.pop(attempt_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _outputs(
        self, queue: asyncio.Queue[EngineOutput | BaseException]
    ) -> AsyncIterator[EngineOutput]:
        while True:
            item = await queue.get()
            if isinstance(item, StreamLost):
                raise item.error
            assert isinstance(item, EngineOutput)
            out = merge_queued(queue, item)
            yield out
            if out.finished:
                return

    async def _read(self) -> None:
        opened = self._opened
        assert opened is not None
        call = self._stub.StreamOutputs(worker_pb2.StreamOutputsRequest(subscriber=self._subscriber))
        try:
            async for batch in call:
                if not opened.done():
                    opened.set_result(None)
                for delta in batch.deltas:
                    queue = self._queues.get(delta.request_id)
                    if queue is not None:
                        queue.put_nowait(output_from_delta(delta.request_id, delta))
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "output stream ended")
        except grpc.aio.AioRpcError as exc:
            logger.warning("output stream from decode worker %s ended: %s", self.worker_id, exc.details())
            lost = StreamLost(exc)
            if not opened.done():
                opened.set_exception(exc)
            queues, self._queues = self._queues, {}
            for queue in queues.values():
                queue.put_nowait(lost)
        finally:
            call.cancel()
