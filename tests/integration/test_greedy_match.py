"""The cluster tests' greedy comparison: exact except at ties, where either token may come."""

from __future__ import annotations

import random

import baton_cluster
import pytest
from baton_cluster import TIE_LOGPROB_GAP, assert_greedy, expected, greedy_mismatch

from baton import LLM, SamplingParams


def _a_near_tie(offline: LLM) -> tuple[list[int], list[int], int, int]:
    """A prompt, its greedy completion, a position where the two likeliest tokens are within
    TIE_LOGPROB_GAP, and the runner-up there (searched on fixed random prompts)."""
    rng = random.Random(5)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    for _ in range(20):
        batch = [[rng.randrange(3, 2000) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
        for prompt, out in zip(batch, offline.generate(batch, params), strict=True):
            for k, position in enumerate(out.logprobs or []):
                first, second = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:2]
                if first[1].logprob - second[1].logprob < TIE_LOGPROB_GAP:
                    return prompt, out.token_ids, k, second[0]
    raise AssertionError("no near tie in 160 random prompts")


def test_exact_greedy_and_its_prefixes_match(offline: LLM) -> None:
    batch = [[7, 8, 9, 10, 11], [300, 200, 100]]
    want = expected(offline, batch, 12)
    assert_greedy(offline, batch, want, 12)
    assert greedy_mismatch(offline, batch[0], want[0][:5], want[0]) is None


def test_a_wrong_token_a_short_completion_or_an_error_is_reported(offline: LLM) -> None:
    prompt = [7, 8, 9, 10, 11]
    (want,) = expected(offline, [prompt], 12)
    wrong = [*want[:4], (want[4] + 1) % 2000, *want[5:]]
    assert "token 4 is" in (greedy_mismatch(offline, prompt, wrong, want) or "")
    with pytest.raises(AssertionError, match="token 4 is"):
        assert_greedy(offline, [prompt], [wrong], 12)
    with pytest.raises(AssertionError, match="11 tokens of 12"):
        assert_greedy(offline, [prompt], [want[:11]], 12)
    with pytest.raises(AssertionError, match="RuntimeError"):
        assert_greedy(offline, [prompt], [RuntimeError("the call failed")], 12)


def test_at_a_near_tie_the_runner_up_branch_is_accepted_and_followed(
    offline: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt, want, k, runner_up = _a_near_tie(offline)
    branch = [*want[:k], runner_up]
    branch += expected(offline, [prompt + branch], len(want) - k - 1)[0]
    assert greedy_mismatch(offline, prompt, branch, want) is None
    off_branch = [*branch[:-1], (branch[-1] + 1) % 2000]  # the branch is followed: a later error is found
    if k + 1 < len(want):
        assert f"token {len(want) - 1} is" in (greedy_mismatch(offline, prompt, off_branch, want) or "")
    monkeypatch.setattr(baton_cluster, "TIE_LOGPROB_GAP", 0.0)  # no ties: the runner-up is wrong
    assert f"token {k} is {runner_up}" in (greedy_mismatch(offline, prompt, branch, want) or "")
