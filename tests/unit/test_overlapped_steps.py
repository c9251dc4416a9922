"""Steps that overlap (the GPU path: step N+1 is queued before step N's outputs are built), driven on
the CPU, where queueing a step computes it: the same tokens, aborts while a step is in flight."""

from __future__ import annotations

from pathlib import Path

from baton import LLM, SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore

PROMPTS = [
    list(range(3, 40)),
    [7, 8, 9],
    list(range(100, 180)),
    list(range(3, 30)),
]  # the last shares a prefix
PARAMS = [
    SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.8, seed=5, ignore_eos=True, logprobs=2),
    SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(max_tokens=11, temperature=0, ignore_eos=True, min_tokens=4),
]


def overlapped(llama_dir: Path) -> EngineCore:
    core = EngineCore(EngineConfig(model=str(llama_dir)))
    core._overlap_steps = True
    return core


def run_all(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        core.add_request(str(i), prompt, params)
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def test_overlapped_steps_give_the_same_tokens(llama_dir: Path) -> None:
    expected = [o.token_ids for o in LLM(str(llama_dir)).generate(PROMPTS, PARAMS)]
    core = overlapped(llama_dir)
    assert list(run_all(core).values()) == expected
    assert core._in_flight is None and not core.has_work()
    core.assert_no_leaks()


def test_a_request_aborted_while_its_step_is_in_flight_gets_nothing_more(llama_dir: Path) -> None:
    core = overlapped(llama_dir)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    core.add_request("a", PROMPTS[0], params)
    core.add_request("b", PROMPTS[2], params)
    core.step()
    core.step()
    assert core._in_flight is not None  # the next step is already queued, with both requests
    (aborted,) = core.abort_requests(["a"])
    assert aborted.finish_reason == "abort"
    later = []
    while core.has_unfinished():
        later += core.step()
    assert {out.request_id for out in later} == {"b"}
    assert sum(len(out.new_token_ids) for out in later) == 50 - 2
    core.assert_no_leaks()
