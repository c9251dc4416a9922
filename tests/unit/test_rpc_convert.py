"""Wire conversions round-trip exactly, and bad sampling values are refused naming the field."""

from __future__ import annotations

import pytest

from baton.shared.engine.outputs import EngineOutput, Logprob
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.rpc import common_pb2
from baton.shared.rpc_convert import (
    delta_from_output,
    first_token_from_dict,
    first_token_to_dict,
    output_from_delta,
    sampling_from_proto,
    sampling_to_proto,
)


def test_sampling_params_round_trip() -> None:
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, stop_token_ids=[4, 9], ignore_eos=True,
        min_tokens=2, logprobs=3, skip_special_tokens=False,
    )  # fmt: skip
    assert sampling_from_proto(sampling_to_proto(params)) == params


def test_unset_fields_take_the_documented_defaults() -> None:
    params = sampling_from_proto(common_pb2.SamplingParams())
    assert (params.max_tokens, params.temperature, params.top_p, params.repetition_penalty) == (
        16,
        1.0,
        1.0,
        1.0,
    )
    assert params.seed is None and params.logprobs is None


def test_bad_sampling_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="top_p"):
        sampling_from_proto(common_pb2.SamplingParams(top_p=2.0))


def test_token_delta_round_trip_with_logprobs() -> None:
    position = {7: Logprob(-0.1, 1), 3: Logprob(-2.5, 2), 11: Logprob(-4.0, 9)}
    out = EngineOutput("r", [11], [position], finish_reason="stop", stop_reason=11, num_prompt_tokens=5)
    delta = delta_from_output(out, num_top_logprobs=2)
    assert [t.token_id for t in delta.logprobs[0].top] == [7, 3]
    back = output_from_delta("r", delta)
    assert back.new_token_ids == [11] and back.finish_reason == "stop" and back.stop_reason == 11
    assert back.new_logprobs is not None and back.new_logprobs[0][11].rank == 9
    assert back.new_logprobs[0][7].logprob == pytest.approx(-0.1)


def test_first_token_trailer_round_trip_and_malformed_trailer() -> None:
    position = {5: Logprob(-0.2, 1), 6: Logprob(-1.5, 2)}
    token, cached = first_token_from_dict(
        first_token_to_dict(EngineOutput("r", [5], [position], num_cached_tokens=32))
    )
    assert (token.token_id, token.rank, cached) == (5, 1, 32)
    assert token.top_logprobs == [(5, -0.2), (6, -1.5)]
    with pytest.raises(ValueError, match="malformed"):
        first_token_from_dict({"token": 1})
