"""The gateway's pure pieces, without a network: stop strings, request validation and its OpenAI
error objects, the gRPC status mapping, token budgets, per-choice seeds, logprobs and usage bodies."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from baton.services.gateway.errors import MAX_MESSAGE_CHARS, OpenAIError, from_grpc, from_validation
from baton.services.gateway.prepare import choice_plans, max_tokens_for, sampling_for
from baton.services.gateway.protocol import INT64_MAX, ChatCompletionRequest, CompletionRequest
from baton.services.gateway.responses import MIN_LOGPROB, completion_logprobs
from baton.services.gateway.stop_strings import StopStringMatcher
from baton.services.gateway.usage import UsageTally
from baton.shared.rpc import common_pb2


# -- stop strings ----------------------------------------------------------------------------------
def stream(matcher: StopStringMatcher, pieces: list[str]) -> str:
    return "".join(matcher.push(p) for p in pieces) + ("" if matcher.matched else matcher.flush())


@pytest.mark.parametrize(
    ("pieces", "stops", "want", "matched"),
    [
        (["Hello ", "wor", "ld"], ["world"], "Hello ", "world"),  # split across pieces
        (["abcSTOPdef"], ["STOP"], "abc", "STOP"),
        (["a", "b", "c"], ["bd"], "abc", None),  # a held prefix that never completes is released
        (["xx END yy ST", "OP"], ["STOP", "END"], "xx ", "END"),  # the earliest stop wins
        (["ab", "cd"], ["bcd", "cd"], "a", "bcd"),
        (["no stop here"], ["zz"], "no stop here", None),
        (["ùñí", "çødé"], ["çø"], "ùñí", "çø"),
    ],
)
def test_stop_strings_cut_the_text_before_the_stop(
    pieces: list[str], stops: list[str], want: str, matched: str | None
) -> None:
    matcher = StopStringMatcher(stops)
    assert stream(matcher, pieces) == want
    assert matcher.matched == matched


def test_stop_string_kept_when_asked_and_nothing_after_a_match() -> None:
    matcher = StopStringMatcher(["##"], include_in_output=True)
    assert matcher.push("a#") == "a"
    assert matcher.push("#b") == "##"
    assert matcher.push("more") == ""


def test_text_that_cannot_start_a_stop_string_is_released_at_once() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc S") == "abc "
    assert matcher.push("x") == "Sx"


# -- validation ------------------------------------------------------------------------------------
def validation_error(model: type, body: object) -> OpenAIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)  # type: ignore[attr-defined]
    return from_validation(RequestValidationError(info.value.errors()))


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({}, "prompt", "prompt is required"),
        ({"prompt": "x", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"prompt": [1, -2]}, "prompt", "list of token ids"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo", "prompt logprobs"),
        ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature", "finite"),
        ({"prompt": "x", "frequency_penalty": float("nan")}, "frequency_penalty", "finite"),
    ],
)
def test_completion_validation_names_the_parameter(body: dict, param: str, fragment: str) -> None:
    error = validation_error(CompletionRequest, body)
    assert error.status == 400 and error.param == param and fragment in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_validation_never_echoes_the_input() -> None:
    secret = "my-very-secret-prompt-" * 100
    error = validation_error(CompletionRequest, {"prompt": "x", "temperature": secret})
    assert "secret" not in error.message and len(error.message) <= MAX_MESSAGE_CHARS


def test_chat_validation() -> None:
    error = validation_error(ChatCompletionRequest, {"messages": [{"role": "user"}], "top_logprobs": 3})
    assert error.param == "top_logprobs"
    error = validation_error(ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]})
    assert error.param == "messages.0.role"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "developer", "content": parts}], "max_tokens": 5, "max_completion_tokens": 7,
         "surprise": 1}
    )  # fmt: skip
    assert chat.conversation() == [{"role": "system", "content": "ab"}]
    assert chat.requested_max_tokens == 7 and chat.unknown_fields == ["surprise"]


def test_prompt_shapes() -> None:
    assert CompletionRequest(prompt="hi").prompts == ["hi"]
    assert CompletionRequest(prompt=[1, 2]).prompts == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]


# -- errors from the Router ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, True),
        (grpc.StatusCode.NOT_FOUND, 404, False),
        (grpc.StatusCode.UNAVAILABLE, 503, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 503, True),
        (grpc.StatusCode.INTERNAL, 500, False),
    ],
)
def test_router_status_codes_map_to_http(code: grpc.StatusCode, status: int, retry_after: bool) -> None:
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "x" * 5000)
    error = from_grpc(exc)
    response = error.response()
    assert response.status_code == status
    assert ("retry-after" in response.headers) == retry_after
    assert len(json.loads(response.body)["error"]["message"]) <= MAX_MESSAGE_CHARS


# -- budgets, seeds, plans -------------------------------------------------------------------------
def test_token_budget() -> None:
    assert max_tokens_for(10, None, None, 100) == 90  # chat default: the rest of the context
    assert max_tokens_for(10, None, 16, 100) == 16  # completions default: 16
    assert max_tokens_for(95, None, 16, 100) == 5  # a default is clipped to the context
    assert max_tokens_for(10, 90, 16, 100) == 90
    with pytest.raises(OpenAIError) as info:
        max_tokens_for(10, 91, 16, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(OpenAIError) as info:
        max_tokens_for(100, None, None, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_choices_get_consecutive_seeds_and_prompt_major_indices() -> None:
    req = CompletionRequest(prompt=[[1, 2], [3]], n=2, seed=INT64_MAX, temperature=0.5)
    plans = choice_plans("r", [[1, 2], [3]], req, [4, 5], None, "m")
    assert [p.index for p in plans] == [0, 1, 2, 3]
    assert [p.request.request_id for p in plans] == ["r-0", "r-1", "r-2", "r-3"]
    assert [list(p.request.token_ids.ids) for p in plans] == [[1, 2], [1, 2], [3], [3]]
    assert [p.request.sampling.seed for p in plans] == [INT64_MAX, -INT64_MAX - 1] * 2  # wraps in int64
    assert [p.request.sampling.max_tokens for p in plans] == [4, 4, 5, 5]
    single = choice_plans("r", [[1]], CompletionRequest(prompt=[1]), [3], None, "m")
    assert single[0].request.request_id == "r" and not single[0].request.sampling.HasField("seed")


def test_engine_rules_apply_with_the_parameter_named() -> None:
    with pytest.raises(OpenAIError) as info:
        sampling_for(CompletionRequest(prompt="x", min_tokens=9), 2, None, 0)
    assert info.value.param == "min_tokens"


# -- response bodies -------------------------------------------------------------------------------
def position(text: str, logprob: float, top: list[tuple[str, float]]) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(
        sampled=common_pb2.TokenLogprob(text=text, logprob=logprob),
        top=[common_pb2.TokenLogprob(text=t, logprob=lp) for t, lp in top],
    )


def test_completion_logprobs_offsets_and_infinities() -> None:
    body, end = completion_logprobs(
        [position("ab", -0.5, [("ab", -0.5), ("x", -1.0)]), position("c", -math.inf, [("d", -0.1)])], 3
    )
    assert body["tokens"] == ["ab", "c"] and body["text_offset"] == [3, 5] and end == 6
    assert body["token_logprobs"] == [-0.5, MIN_LOGPROB]
    assert body["top_logprobs"] == [{"ab": -0.5, "x": -1.0}, {"d": pytest.approx(-0.1), "c": MIN_LOGPROB}]
    json.dumps(body, allow_nan=False)


def test_usage_counts_each_prompt_once() -> None:
    tally = UsageTally([[1, 2, 3], [4]], n=2)
    for choice, tokens in enumerate([5, 6, 7, 8]):
        cached = 2 if choice == 0 else 0
        tally.add(choice, common_pb2.Usage(completion_tokens=tokens, cached_prompt_tokens=cached))
    assert tally.body() == {
        "prompt_tokens": 4,
        "completion_tokens": 26,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
