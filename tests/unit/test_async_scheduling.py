"""`async_scheduling`: a decode-only step's successor is queued before its tokens are read, its input
tokens taken from the sampled ids on the device. Driven on the CPU, where queueing a step computes it:
the same tokens as a step at a time, for requests that end by length, by a stop token found one step
late, by the context length, and beside requests that need a step at a time (penalties, seeds,
min_tokens, logprobs); aborts while a continued step is in flight; a batch that runs out of blocks; a
decode worker's commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton import LLM, SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore

PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 180)), list(range(3, 30)), [50, 51]]


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


def generate(llama_dir: Path, params: list[SamplingParams], **engine: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(llama_dir), **{"async_scheduling": False, **engine})
    outputs = llm.generate(PROMPTS[: len(params)], params)
    return [o.token_ids for o in outputs], llm


def both(llama_dir: Path, params: list[SamplingParams], **engine: object) -> tuple[list[list[int]], LLM]:
    """Tokens a step at a time and with async scheduling (asserted equal), and the async engine."""
    expected, _ = generate(llama_dir, params, **engine)
    got, llm = generate(llama_dir, params, async_scheduling=True, **engine)
    assert got == expected
    llm.engine.assert_no_leaks()
    return got, llm


def test_requests_ending_by_length_get_the_same_tokens(llama_dir: Path) -> None:
    _, llm = both(llama_dir, [greedy(9), greedy(17), greedy(4), greedy(12), greedy(1)])
    # every decode step after the first continues its predecessor, until the batch changes
    assert llm.engine.num_continued_steps >= 12


def test_a_stop_token_found_one_step_late_drops_the_extra_token(llama_dir: Path) -> None:
    plain, _ = generate(llama_dir, [greedy(20) for _ in PROMPTS])
    # stop each request at its own 3rd..7th token: found when a continued step is already queued
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[tokens[2 + i]])
        for i, tokens in enumerate(plain)
    ]
    got, llm = both(llama_dir, params)
    for i, tokens in enumerate(got):
        stop = plain[i][2 + i]
        assert tokens == plain[i][: plain[i].index(stop) + 1]
    assert llm.engine.num_continued_steps > 0


def test_requests_reaching_the_context_length_end_there(llama_dir: Path) -> None:
    got, llm = both(llama_dir, [greedy(100) for _ in PROMPTS], max_model_len=96)
    assert [len(p) + len(t) for p, t in zip(PROMPTS, got, strict=True)] == [96] * len(PROMPTS)
    assert llm.engine.num_continued_steps > 0


def test_requests_that_need_their_tokens_on_the_host_step_one_at_a_time(llama_dir: Path) -> None:
    params = [
        greedy(12),
        SamplingParams(max_tokens=14, temperature=0.8, seed=5, ignore_eos=True, logprobs=2),
        greedy(6, repetition_penalty=1.3),
        greedy(11, min_tokens=4),
        greedy(25),
    ]
    _, llm = both(llama_dir, params)
    # the seeded and the penalised requests hold the batch to a step at a time while they run; the
    # longest runs on alone afterwards and is continued
    assert llm.engine.num_continued_steps > 0


def test_logprobs_and_unseeded_sampling_are_continued(llama_dir: Path) -> None:
    params = [greedy(10, logprobs=3), greedy(8, logprobs=0)]
    llm = LLM(str(llama_dir), async_scheduling=True)
    outputs = llm.generate(PROMPTS[:2], params)
    expected = LLM(str(llama_dir), async_scheduling=False).generate(PROMPTS[:2], params)
    for got, want in zip(outputs, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs is not None and want.logprobs is not None
        for g, w in zip(got.logprobs, want.logprobs, strict=True):
            assert g.keys() == w.keys()
            assert all(g[t].logprob == pytest.approx(w[t].logprob, abs=1e-5) for t in g)
    assert llm.engine.num_continued_steps > 0
    sampled = LLM(str(llama_dir), async_scheduling=True).generate(
        PROMPTS, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in sampled] == [10] * len(PROMPTS)


def test_a_batch_short_of_blocks_falls_back_and_preempts_as_before(llama_dir: Path) -> None:
    # 14 blocks of 16 tokens for five requests growing to 40-120 tokens: preemptions happen
    _, llm = both(llama_dir, [greedy(40) for _ in PROMPTS], num_kv_blocks=14, max_model_len=192)
    assert llm.engine.scheduler.num_preemptions > 0


def test_a_request_aborted_while_its_continued_step_is_in_flight_gets_nothing_more(llama_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), async_scheduling=True))
    params = greedy(30)
    core.add_request("a", PROMPTS[0], params)
    core.add_request("b", PROMPTS[2], params)
    outputs = core.step() + core.step() + core.step()  # a prefill, then decodes continued
    assert core.num_continued_steps > 0 and core._in_flight is not None
    (aborted,) = core.abort_requests(["a"])
    assert aborted.finish_reason == "abort"
    while core.has_unfinished():
        outputs += core.step()
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "b") == 30
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "a") < 30
    assert core._in_flight is None and not core.has_work()
    core.assert_no_leaks()


def test_a_request_joining_mid_run_is_scheduled_then_continued(llama_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), async_scheduling=True))
    tokens: dict[str, list[int]] = {"0": [], "1": []}
    core.add_request("0", PROMPTS[0], greedy(15))
    for _ in range(4):
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    continued = core.num_continued_steps
    core.add_request("1", PROMPTS[1], greedy(15))  # waits: the next step is scheduled, not continued
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    assert continued > 0 and core.num_continued_steps > continued + 5
    alone = LLM(str(llama_dir), async_scheduling=False).generate(
        PROMPTS[:2], greedy(15)
    )  # greedy: each its own tokens
    assert [tokens["0"], tokens["1"]] == [o.token_ids for o in alone]
    core.assert_no_leaks()
