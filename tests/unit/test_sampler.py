"""The sampler on hand-made logits: exact masks, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from baton.shared.engine.sampler import Sampler, SamplingRow, _apply_penalties, _filter
from baton.shared.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])  # token 0 most likely


def row(**kw: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), prompt_token_ids=[], output_token_ids=[])


def kept(logits: torch.Tensor, **kw: object) -> list[int]:
    return torch.isfinite(_filter(logits.clone(), [SamplingParams(**kw)]))[0].nonzero().flatten().tolist()


def test_top_k_keeps_the_k_most_likely() -> None:
    assert kept(LOGITS, top_k=2) == [0, 1]
    assert kept(LOGITS, top_k=0) == [0, 1, 2, 3, 4, 5]
    assert kept(LOGITS, top_k=-1) == [0, 1, 2, 3, 4, 5]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS[0], dim=-1)  # ~[0.64, 0.23, 0.09, 0.03, ...]
    assert kept(LOGITS, top_p=float(probs[0]) - 1e-3) == [0]
    assert kept(LOGITS, top_p=float(probs[0]) + 1e-3) == [0, 1]
    assert kept(LOGITS, top_p=float(probs[:3].sum()) + 1e-3) == [0, 1, 2, 3]
    assert kept(LOGITS, top_p=1.0) == [0, 1, 2, 3, 4, 5]


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    # p_i / p_0 = exp(-i): 0.37, 0.14, 0.05, ...
    assert kept(LOGITS, min_p=0.3) == [0, 1]
    assert kept(LOGITS, min_p=1.0) == [0]


def test_filters_combine_per_row() -> None:
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])
    out = _filter(logits, [SamplingParams(top_k=1), SamplingParams(top_k=3)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3, 4, 5]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    _apply_penalties(logits, SamplingRow(SamplingParams(repetition_penalty=2.0), [0], [1]))
    assert logits.tolist() == [1.0, -4.0, 1.0, 1.0]


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    _apply_penalties(logits, SamplingRow(params, prompt_token_ids=[3, 3], output_token_ids=[1, 1, 2]))
    assert logits.tolist() == [0.0, -1.25, -0.75, 0.0]


def test_greedy_picks_the_argmax_and_reports_logprobs() -> None:
    out = Sampler(CPU)(LOGITS, [row(temperature=0, logprobs=2)])
    expected = torch.log_softmax(LOGITS[0], dim=-1)
    assert out.token_ids == [0]
    assert out.ranks == [1]
    assert out.logprobs[0] == pytest.approx(float(expected[0]))
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1]


def test_logprobs_are_of_the_raw_distribution_not_the_filtered_one() -> None:
    out = Sampler(CPU)(LOGITS, [row(temperature=0.5, top_k=1, logprobs=0)])
    assert out.token_ids == [0]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(LOGITS[0], -1)[0]))
    assert out.top_logprobs == [[]]


def test_banned_tokens_are_never_sampled() -> None:
    r = SamplingRow(SamplingParams(temperature=0), [], [], banned_token_ids=frozenset({0, 1}))
    assert Sampler(CPU)(LOGITS, [r]).token_ids == [2]


def test_sampling_follows_the_distribution() -> None:
    sampler = Sampler(CPU, seed=0)
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]]).repeat(4000, 1)
    tokens = sampler(logits, [row(temperature=1.0)] * 4000).token_ids
    freq = [tokens.count(t) / len(tokens) for t in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_top_k_sampling_never_leaves_the_top_k() -> None:
    sampler = Sampler(CPU, seed=0)
    logits = torch.randn(500, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor(sampler(logits, [row(temperature=1.5, top_k=3)] * 500).token_ids)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == tokens[:, None]).any(dim=-1).all()


def test_seeded_rows_depend_only_on_seed_and_position() -> None:
    sampler = Sampler(CPU, seed=0)
    logits = torch.zeros(1, 1000)
    seeded = SamplingRow(SamplingParams(temperature=1.0, seed=7), [1, 2], [5, 6, 7])
    alone = sampler(logits, [seeded]).token_ids[0]
    crowd = sampler(logits.repeat(5, 1), [row(), row(seed=3), seeded, row(), row()]).token_ids[2]
    assert alone == crowd
    later = SamplingRow(SamplingParams(temperature=1.0, seed=7), [1, 2], [5, 6, 7, 8])
    other_seed = SamplingRow(SamplingParams(temperature=1.0, seed=8), [1, 2], [5, 6, 7])
    draws = {alone, sampler(logits, [later]).token_ids[0], sampler(logits, [other_seed]).token_ids[0]}
    assert len(draws) == 3  # 1000 equally likely tokens: collisions are very unlikely
