"""What the engine hands back: per-step deltas (EngineOutput) and finished results (RequestOutput)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token under the model's raw distribution at one position."""

    logprob: float
    rank: int | None = None
    """1-based rank among all tokens (1 = most likely)."""
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]
"""At one generated position: the sampled token and the requested top alternatives, by token id."""


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request: new tokens (usually one) and, at the end, why it ended.
    Treat it as immutable; it is not frozen only because a step builds one per running request and a
    frozen dataclass takes three times as long to construct."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or 'error' once finished; None while running."""
    stop_reason: int | None = None
    """The stop token id that ended the request, if one did."""
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(first: EngineOutput, then: EngineOutput) -> EngineOutput:
    """One output carrying both steps' tokens (`first` must not be finished); the end state is `then`'s."""
    if first.finished or first.request_id != then.request_id:
        raise ValueError(
            f"cannot merge {then.request_id!r} into {first.request_id!r} (finished: {first.finished})"
        )
    logprobs = None
    if first.new_logprobs is not None or then.new_logprobs is not None:
        logprobs = [*(first.new_logprobs or []), *(then.new_logprobs or [])]
    return replace(then, new_token_ids=[*first.new_token_ids, *then.new_token_ids], new_logprobs=logprobs)


def merge_pending(
    queue: asyncio.Queue[_T | BaseException],
    item: _T,
    merge: Callable[[_T, _T], _T],
    is_last: Callable[[_T], bool],
) -> _T:
    """`item` merged with the pieces of its request already queued behind it, so a reader that fell
    behind handles one per visit; stops at the request's last piece, or at an exception, which is put
    back to be raised on the next visit."""
    while not is_last(item) and not queue.empty():
        following = queue.get_nowait()
        if isinstance(following, BaseException):
            queue.put_nowait(following)
            break
        item = merge(item, following)
    return item


def merge_queued(queue: asyncio.Queue[EngineOutput | BaseException], out: EngineOutput) -> EngineOutput:
    """`out` merged with the outputs of its request already queued behind it (see `merge_pending`)."""
    return merge_pending(queue, out, merge_outputs, _is_finished)


def _is_finished(out: EngineOutput) -> bool:
    return out.finished


@dataclass
class CompletionOutput:
    """One generated sequence (Baton generates one per prompt)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | None = None


@dataclass
class RequestOutput:
    """A prompt and what was generated for it, as vLLM's `RequestOutput`; the first (only) completion's
    fields are also available directly: `.text`, `.token_ids`, `.finish_reason`, `.logprobs`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[PositionLogprobs] | None:
        return self.outputs[0].logprobs
