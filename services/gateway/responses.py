"""OpenAI response bodies and stream chunks for completions and chat, built from choice events."""

from __future__ import annotations

import json
import math
from typing import Any

from baton.services.gateway.generation import ChoiceEvent, ChoiceResult
from baton.shared.rpc import common_pb2

MIN_LOGPROB = -9999.0
"""Stands in for -inf, which JSON cannot carry (as vLLM does)."""


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# -- logprobs ------------------------------------------------------------------------------------
def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def completion_logprobs(
    positions: list[common_pb2.PositionLogprobs], text_offset: int
) -> tuple[dict[str, Any], int]:
    """The completions API's logprobs object for these positions, and the text offset after them."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for position in positions:
        token = position.sampled.text
        tokens.append(token)
        token_logprobs.append(_logprob(position.sampled.logprob))
        alternatives = {alt.text: _logprob(alt.logprob) for alt in position.top}
        alternatives.setdefault(token, _logprob(position.sampled.logprob))  # the sampled one is always in
        top.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(token)
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
    return body, text_offset


def chat_logprobs(positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any]:
    """The chat API's logprobs object: `content`, one entry per token with its top alternatives."""

    def entry(lp: common_pb2.TokenLogprob) -> dict[str, Any]:
        return {"token": lp.text, "logprob": _logprob(lp.logprob), "bytes": list(lp.text.encode())}

    return {
        "content": [{**entry(p.sampled), "top_logprobs": [entry(alt) for alt in p.top]} for p in positions]
    }


# -- completions -----------------------------------------------------------------------------------
def completion_choice(result: ChoiceResult, echo: str, want_logprobs: bool) -> dict[str, Any]:
    logprobs = completion_logprobs(result.logprobs, len(echo))[0] if want_logprobs else None
    return {
        "index": result.index,
        "text": echo + result.text,
        "logprobs": logprobs,
        "finish_reason": result.finish_reason,
        "stop_reason": result.stop_reason,
    }


def completion_chunk(
    header: dict[str, Any], event: ChoiceEvent, text_prefix: str, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    choice = {
        "index": event.index,
        "text": text_prefix + event.text,
        "logprobs": logprobs,
        "finish_reason": event.finish_reason,
    }
    if event.finish_reason is not None:
        choice["stop_reason"] = event.stop_reason
    return {**header, "choices": [choice]}


# -- chat ----------------------------------------------------------------------------------------
def chat_choice(result: ChoiceResult, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": result.index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": chat_logprobs(result.logprobs) if want_logprobs else None,
        "finish_reason": result.finish_reason,
        "stop_reason": result.stop_reason,
    }


def chat_role_chunk(header: dict[str, Any], index: int) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""}
    return {**header, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}


def chat_chunk(header: dict[str, Any], event: ChoiceEvent, want_logprobs: bool) -> dict[str, Any]:
    delta = {"content": event.text} if event.text or event.finish_reason is None else {}
    choice: dict[str, Any] = {
        "index": event.index,
        "delta": delta,
        "logprobs": chat_logprobs(event.logprobs) if want_logprobs and event.logprobs else None,
        "finish_reason": event.finish_reason,
    }
    if event.finish_reason is not None:
        choice["stop_reason"] = event.stop_reason
    return {**header, "choices": [choice]}
