"""One HTTP request becomes one Router request per choice (n choices for each prompt). Each
stream's text goes through the stop-string matcher; the streams are merged into one sequence of
events, in arrival order. Closing the sequence cancels every stream still open, which aborts those
requests on the router and the workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from baton.services.gateway.stop_strings import StopStringMatcher
from baton.shared.rpc import common_pb2, router_pb2

_FINISH_REASONS = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass
class ChoicePlan:
    """What one choice asks of the Router."""

    index: int
    request: router_pb2.GenerateRequest
    stops: list[str]
    include_stop_str: bool = False


@dataclass
class ChoiceEvent:
    """A piece of one choice: text and tokens since its previous event; the last one has finish_reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.PositionLogprobs]
    finish_reason: str | None = None
    """stop, length, abort or error (then `error` says what went wrong)."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice."""
    error: str = ""
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)


@dataclass
class ChoiceTimings:
    """Gateway-side latencies of one choice (for metrics)."""

    start_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)

    def on_tokens(self, now_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = now_s
        elif self.last_token_s is not None:
            self.inter_token_s.append(now_s - self.last_token_s)
        self.last_token_s = now_s


class ResponseStream(Protocol):
    """One request's responses from the Router (a Generate call, or a request on a shared stream)."""

    def __aiter__(self) -> AsyncIterator[router_pb2.GenerateResponse]: ...

    def cancel(self) -> object:
        """Abort the request unless it ended."""


OpenCall = Callable[[router_pb2.GenerateRequest], ResponseStream]
OnFinish = Callable[[ChoiceEvent, ChoiceTimings], None]


async def choice_events(
    open_call: OpenCall, plan: ChoicePlan, on_finish: OnFinish | None = None
) -> AsyncGenerator[ChoiceEvent, None]:
    """One choice's events; a stop string ends it (and cancels its Router stream)."""
    timings = ChoiceTimings(time.perf_counter())
    matcher = StopStringMatcher(plan.stops, plan.include_stop_str)
    call = open_call(plan.request)
    try:
        async for response in call:
            if response.token_ids:
                timings.on_tokens(time.perf_counter())
            event = _event(plan.index, response, matcher)
            if event.finish_reason is not None and on_finish is not None:
                on_finish(event, timings)
            yield event
            if event.finish_reason is not None:
                return
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "router stream ended early"
        )
    finally:
        call.cancel()  # no-op when the stream finished; else the request is aborted everywhere


def _event(index: int, response: router_pb2.GenerateResponse, matcher: StopStringMatcher) -> ChoiceEvent:
    text = matcher.push(response.text)
    finish = _FINISH_REASONS[response.finish_reason]
    stop_reason: str | int | None = None
    if matcher.matched is not None:
        finish, stop_reason = "stop", matcher.matched
    elif finish is not None:
        text += matcher.flush()
        if response.HasField("stop_token_id"):
            stop_reason = response.stop_token_id
    return ChoiceEvent(
        index,
        text,
        list(response.token_ids),
        list(response.logprobs),
        finish,
        stop_reason,
        response.error,
        response.usage,
    )


async def merged_events(
    open_call: OpenCall, plans: list[ChoicePlan], on_finish: OnFinish | None = None
) -> AsyncGenerator[ChoiceEvent, None]:
    """Every choice's events as they arrive. A failure of any choice (a gRPC error) is raised here and
    cancels the others; so does closing this generator."""
    if len(plans) == 1:
        async with contextlib.aclosing(choice_events(open_call, plans[0], on_finish)) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(plan: ChoicePlan) -> None:
        try:
            async with contextlib.aclosing(choice_events(open_call, plan, on_finish)) as events:
                async for event in events:
                    queue.put_nowait(event)
        except Exception as exc:
            queue.put_nowait(exc)
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(plan)) for plan in plans]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class ChoiceResult:
    """A whole choice, gathered from its events (non-streamed responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str = ""
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)

    def add(self, event: ChoiceEvent) -> None:
        self.text += event.text
        self.token_ids += event.token_ids
        self.logprobs += event.logprobs
        self.finish_reason = event.finish_reason
        self.stop_reason = event.stop_reason
        self.error = event.error
        self.usage = event.usage


async def gather_choices(events: AsyncGenerator[ChoiceEvent, None], num_choices: int) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(num_choices)]
    async with contextlib.aclosing(events):
        async for event in events:
            results[event.index].add(event)
    return results
