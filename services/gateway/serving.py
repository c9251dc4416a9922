"""What completions and chat share once their Router requests are planned: waiting for the first
event (so errors before any work is done are plain HTTP errors), streaming SSE chunks or gathering
a whole response, and aborting everything when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from fastapi import Request
from fastapi.responses import StreamingResponse

from baton.services.gateway.errors import from_grpc, unavailable
from baton.services.gateway.generation import ChoiceEvent, ChoiceResult, gather_choices
from baton.services.gateway.responses import sse
from baton.services.lifecycle import request_logger

request_log = request_logger(__name__)

_T = TypeVar("_T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response; its requests were aborted."""


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work` unless the client disconnects first: then `work` is cancelled (which aborts its
    Router streams) and ClientDisconnected is raised. gRPC errors become OpenAI errors."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientDisconnected()
        try:
            return task.result()
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from exc
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def gather_or_fail(
    request: Request, events: AsyncGenerator[ChoiceEvent, None], num_choices: int
) -> list[ChoiceResult]:
    """Every choice in full; a choice that failed after it started fails the request (503)."""
    results = await unless_disconnected(request, gather_choices(events, num_choices))
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise unavailable(f"generation failed: {failed[0].error}")
    return results


async def first_event(request: Request, events: AsyncGenerator[ChoiceEvent, None]) -> ChoiceEvent:
    """The stream's first event; an error before it (bad input, no capacity) is an HTTP error."""

    async def first() -> ChoiceEvent:
        async for event in events:
            return event
        raise unavailable("the router ended the stream without a response")

    return await unless_disconnected(request, first())


ChunkRenderer = Callable[[ChoiceEvent], Iterable[dict[str, Any]]]


def sse_response(
    request_id: str,
    opening: Iterable[dict[str, Any]],
    first: ChoiceEvent,
    events: AsyncGenerator[ChoiceEvent, None],
    render: ChunkRenderer,
    closing: Callable[[], Iterable[dict[str, Any]]],
) -> StreamingResponse:
    """`data: {chunk}` events: the opening chunks, each event's chunks, the closing chunks (usage),
    then `data: [DONE]`. A choice that fails mid-stream, or a Router error, sends an OpenAI error
    object and then `[DONE]`. A client that disconnects cancels this body, which aborts the rest."""

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in opening:
                yield sse(chunk)
            event: ChoiceEvent | None = first
            while event is not None:
                if event.finish_reason == "error":
                    yield sse(unavailable(f"generation failed: {event.error}").body())
                    break
                for chunk in render(event):
                    yield sse(chunk)
                event = await anext(events, None)
            else:
                for chunk in closing():
                    yield sse(chunk)
        except grpc.aio.AioRpcError as exc:
            yield sse(from_grpc(exc).body())
        except asyncio.CancelledError:
            request_log.info("request %s: client disconnected mid-stream, aborted", request_id)
            raise
        finally:
            await events.aclose()
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
