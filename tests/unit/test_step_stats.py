"""StepStats: which steps count as prefill and which as decode, and what their means say."""

from __future__ import annotations

from pathlib import Path

from baton import LLM, SamplingParams
from baton.shared.engine.step_stats import StepStats


def test_an_engine_counts_its_prefill_and_decode_steps(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), max_num_batched_tokens=64, async_scheduling=False)  # continued: next test
    prompts = [list(range(10 + i, 100 + i)) for i in range(3)]  # 270 tokens: at least five 64-token steps
    llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    stats = llm.engine.step_stats
    assert stats.prefill.steps >= 5 and stats.prefill.tokens >= 270
    assert stats.prefill.tokens + stats.decode.tokens == 270 + 3 * 4  # the last token is never fed back
    # decodes ride along in prefill steps (counted there) until the last prompt is in
    assert stats.decode.steps >= 3 and stats.decode.steps <= stats.decode.tokens <= 3 * stats.decode.steps
    for totals in (stats.prefill, stats.decode):
        assert totals.launch_s > 0 and totals.wait_s >= 0 and totals.finish_s > 0
        assert 0 < totals.launch_cpu_s <= totals.launch_s * 1.05  # a thread's CPU time within its wall time
    summary = stats.summary()
    assert summary.startswith(f"{stats.prefill.steps} prefill steps (mean ")
    mean = stats.decode.tokens / stats.decode.steps
    assert f"{stats.decode.steps} decode steps (mean {mean:.0f} tokens" in summary
    per_step = stats.as_dict()["decode"]["per_step"]
    assert per_step["tokens"] == mean
    assert per_step["launch_ms"] == 1e3 * stats.decode.launch_s / stats.decode.steps
    assert per_step["launch_cpu_ms"] == 1e3 * stats.decode.launch_cpu_s / stats.decode.steps
    stats.reset()
    assert stats.as_dict()["prefill"]["steps"] == 0 and stats.prefill is not stats.decode


def test_no_steps_read_as_zeros() -> None:
    assert StepStats().summary() == (
        "0 prefill steps (mean 0 tokens, launch 0.00 ms (0.00 ms CPU), wait 0.00 ms, finish 0.00 ms), "
        "0 decode steps (mean 0 tokens, launch 0.00 ms (0.00 ms CPU), wait 0.00 ms, finish 0.00 ms)"
    )


def test_continued_steps_are_counted_and_named(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), async_scheduling=True)
    llm.generate([list(range(10, 40))], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stats = llm.engine.step_stats
    # one prefill step (the 1st token), then 7 decode steps: each continues the one before it but the
    # first, which the prefill step's tokens had to be read for
    assert (stats.decode.steps, stats.decode.continued, llm.engine.num_continued_steps) == (7, 6, 6)
    assert "7 decode steps, 6 continued (mean 1 tokens" in stats.summary()
    assert stats.as_dict()["decode"]["continued"] == 6
