"""Disaggregation in the engine core, no network: a prefill-only engine ships each layer's prompt KV,
a decode engine reserves blocks, takes the layers and the first token, and decodes to the same tokens
as one engine doing everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from baton import LLM, SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache import gather_prompt_kv, layer_runs
from baton.shared.engine.scheduler import SampledToken

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 180))]


def shipped_prefill(prefill: EngineCore, request_id: str, prompt: list[int], params: SamplingParams):
    """Prefill `prompt` on a prefill-only engine; returns its KV by layer (read from the announced
    blocks, which are then released) and its one output."""
    announced: list[tuple[str, list[int], Any]] = []
    prefill.prompt_kv_sink = lambda rid, block_ids, ready: announced.append((rid, block_ids, ready))
    prefill.add_request(request_id, prompt, params, prefill_only=True)
    outputs = []
    while prefill.has_unfinished():
        outputs += prefill.step()
    (out,) = outputs
    assert out.finished and len(out.new_token_ids) == 1
    ((rid, block_ids, ready),) = announced
    assert rid == request_id and ready is None  # on a CPU the KV is there once announced
    assert len(block_ids) == -(-len(prompt) // prefill.config.block_size)
    kv = gather_prompt_kv(prefill.attention, prefill.kv_caches, torch.tensor(block_ids))
    assert prefill.release_prompt_kv(request_id)
    return dict(enumerate(kv)), out


def decode_remote(
    decode: EngineCore, request_id: str, prompt, params, layers, first_out, run: int = 1
) -> list[int]:
    """Decode from pushed `layers`, written one at a time (run 1) or in runs of `run` layers."""
    block_ids = decode.reserve(request_id, prompt, params)
    assert block_ids is not None and len(block_ids) == -(-len(prompt) // decode.config.block_size)
    assert not decode.has_work()  # a reservation waits for its KV, not for a step
    ordered = [kv for _, kv in sorted(layers.items())]
    for first in range(0, len(ordered), run):
        if run == 1:
            decode.write_reserved_kv(request_id, first, ordered[first])
        else:
            decode.write_reserved_kv_run(request_id, first, torch.stack(ordered[first : first + run]))
    first = SampledToken(first_out.new_token_ids[0])
    tokens = list(decode.commit_reserved(request_id, first, first_out.num_cached_tokens).new_token_ids)
    while decode.has_unfinished():
        for out in decode.step():
            tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize(("chunk_budget", "run"), [(2048, 1), (16, 1), (2048, 3)])
def test_prefill_then_remote_decode_matches_one_engine(llama_dir: Path, chunk_budget: int, run: int) -> None:
    expected = [o.token_ids for o in LLM(str(llama_dir)).generate(PROMPTS, GREEDY)]
    prefill = EngineCore(EngineConfig(model=str(llama_dir), max_num_batched_tokens=chunk_budget))
    decode = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_model_len=512))
    for i, prompt in enumerate(PROMPTS):
        layers, first = shipped_prefill(prefill, f"r{i}", prompt, GREEDY)
        assert sorted(layers) == list(range(prefill.model_config.num_layers))
        assert decode_remote(decode, f"r{i}", prompt, GREEDY, layers, first, run) == expected[i]
    prefill.assert_no_leaks()
    decode.assert_no_leaks()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_commits_past_max_num_seqs_wait_ready_and_decode_the_same_tokens(
    llama_dir: Path, async_scheduling: bool
) -> None:
    expected = [o.token_ids for o in LLM(str(llama_dir), async_scheduling=False).generate(PROMPTS, GREEDY)]
    prefill = EngineCore(EngineConfig(model=str(llama_dir)))
    decode = EngineCore(
        EngineConfig(
            model=str(llama_dir),
            num_kv_blocks=64,
            max_model_len=512,
            max_num_seqs=1,
            async_scheduling=async_scheduling,
        )
    )
    shipped = [shipped_prefill(prefill, f"r{i}", prompt, GREEDY) for i, prompt in enumerate(PROMPTS)]
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        assert decode.reserve(f"r{i}", prompt, GREEDY) is not None  # all reserved: no running slot needed
    for i, (layers, first_out) in enumerate(shipped):
        for layer, kv in sorted(layers.items()):
            decode.write_reserved_kv(f"r{i}", layer, kv)
        first = SampledToken(first_out.new_token_ids[0])
        tokens[f"r{i}"] = list(decode.commit_reserved(f"r{i}", first, 0).new_token_ids)
    assert decode.stats().num_running == 1 and decode.stats().num_waiting == 2
    while decode.has_unfinished():
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids
            assert decode.stats().num_running <= 1
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert (decode.num_continued_steps > 0) == async_scheduling
    prefill.assert_no_leaks()
    decode.assert_no_leaks()


def test_commits_join_the_continued_decode_steps(llama_dir: Path) -> None:
    # a decode worker's arrivals join the step queued behind the one in flight, instead of holding
    # the batch to a step at a time until they have run once
    expected = [o.token_ids for o in LLM(str(llama_dir), async_scheduling=False).generate(PROMPTS, GREEDY)]
    prefill = EngineCore(EngineConfig(model=str(llama_dir)))
    decode = EngineCore(
        EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_model_len=512, async_scheduling=True)
    )
    shipped = [shipped_prefill(prefill, f"r{i}", prompt, GREEDY) for i, prompt in enumerate(PROMPTS)]
    tokens: dict[str, list[int]] = {}

    def commit(i: int) -> None:
        layers, first_out = shipped[i]
        assert decode.reserve(f"r{i}", PROMPTS[i], GREEDY) is not None
        for layer, kv in sorted(layers.items()):
            decode.write_reserved_kv(f"r{i}", layer, kv)
        first = SampledToken(first_out.new_token_ids[0])
        tokens[f"r{i}"] = list(decode.commit_reserved(f"r{i}", first, 0).new_token_ids)

    def step() -> None:
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids

    commit(0)
    for i in range(1, len(PROMPTS)):
        step()
        step()
        assert decode._in_flight is not None  # the commit lands while a continued step is queued
        commit(i)
    while decode.has_unfinished():
        step()
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected
    decode_steps = decode.step_stats.decode
    assert decode_steps.continued == decode_steps.steps - 1  # all but the very first
    decode.assert_no_leaks()


def test_prefill_worker_prefix_cache_hits_are_counted(llama_dir: Path) -> None:
    prefill = EngineCore(EngineConfig(model=str(llama_dir)))
    shared = list(range(50, 98))  # three full blocks
    shipped_prefill(prefill, "a", [*shared, 1, 2], GREEDY)
    _, second = shipped_prefill(prefill, "b", [*shared, 3, 4], GREEDY)
    assert second.num_cached_tokens == 48
    assert prefill.stats().prefix_hit_tokens == 48


def test_reservation_respects_capacity_and_abort_frees_it(llama_dir: Path) -> None:
    decode = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=100, max_model_len=1024))
    assert decode.reserve("big", list(range(1, 1000)), GREEDY) is not None  # 63 blocks
    assert decode.reserve("too-big", list(range(1, 700)), GREEDY) is None  # 44 more don't fit
    assert decode.stats().num_reserved == 1
    with pytest.raises(ValueError, match="already in use"):
        decode.reserve("big", [1, 2], GREEDY)
    decode.write_reserved_kv("big", 0, torch.zeros(2, 63, 16, 2, 32))  # keeps its block index...
    (out,) = decode.abort_requests(["big"])  # ...which the abort drops (assert_no_leaks checks)
    assert out.finish_reason == "abort"
    with pytest.raises(KeyError, match="no reservation"):
        decode.write_reserved_kv("big", 0, torch.zeros(2, 63, 16, 2, 32))
    decode.assert_no_leaks()


def test_write_rejects_a_mis_shaped_layer(llama_dir: Path) -> None:
    decode = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, max_model_len=256))
    decode.reserve("r", list(range(1, 20)), GREEDY)  # 2 blocks
    with pytest.raises(ValueError, match="expected"):
        decode.write_reserved_kv("r", 0, torch.randn(2, 3, 16, 2, 32))
    num_layers = decode.model_config.num_layers
    with pytest.raises(ValueError, match="out of range"):  # a run past the last layer
        decode.write_reserved_kv_run("r", num_layers - 1, torch.randn(2, 2, 2, 16, 2, 32))
    decode.fail_request("r", "transfer failed")
    decode.assert_no_leaks()


def test_first_token_that_ends_the_request_finishes_it_at_commit(llama_dir: Path) -> None:
    decode = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, max_model_len=256))
    params = SamplingParams(max_tokens=1, temperature=0)
    decode.reserve("r", [5, 6, 7], params)
    out = decode.commit_reserved("r", SampledToken(42), 0)
    assert out.finish_reason == "length" and out.new_token_ids == [42]
    decode.assert_no_leaks()


def test_an_announced_prompt_keeps_its_blocks_until_released(llama_dir: Path) -> None:
    engine = EngineCore(EngineConfig(model=str(llama_dir), enable_prefix_caching=False))
    announced: list[str] = []
    engine.prompt_kv_sink = lambda rid, block_ids, ready: announced.append(rid)
    engine.add_request("a", list(range(3, 40)), GREEDY, prefill_only=True)  # 3 blocks
    (out,) = engine.step()
    assert out.finished and announced == ["a"]
    assert engine.stats().num_held_blocks == 3  # finished, but its KV is still to be read
    with pytest.raises(AssertionError, match=r"prompt KV never released for \['a'\]"):
        engine.assert_no_leaks()
    with pytest.raises(ValueError, match="still being read"):  # its id is not free yet
        engine.add_request("a", [1, 2, 3], GREEDY, prefill_only=True)
    assert engine.release_prompt_kv("a")
    assert not engine.release_prompt_kv("a")  # once only
    assert engine.stats().num_held_blocks == 0
    engine.assert_no_leaks()


def test_a_request_aborted_after_its_announcement_keeps_its_blocks_until_released(llama_dir: Path) -> None:
    """On a GPU the announcing step is still running when an abort arrives; its blocks must not go
    to another request before the reader let go of them."""
    engine = EngineCore(EngineConfig(model=str(llama_dir), enable_prefix_caching=False))
    engine.prompt_kv_sink = lambda rid, block_ids, ready: None
    engine.add_request("a", list(range(3, 40)), GREEDY, prefill_only=True)
    engine._in_flight = engine._launch()  # announced; its step not yet taken in
    (aborted,) = engine.abort_requests(["a"])
    assert aborted.finish_reason == "abort"
    assert engine.step() == []  # the step's token for an aborted request is dropped
    assert engine.stats().num_held_blocks == 3
    engine.release_prompt_kv("a")
    engine.assert_no_leaks()


def test_a_release_before_the_request_ends_lets_it_free_its_blocks_as_usual(llama_dir: Path) -> None:
    engine = EngineCore(EngineConfig(model=str(llama_dir), enable_prefix_caching=False))
    engine.add_request("a", list(range(3, 40)), GREEDY, prefill_only=True)
    engine.scheduler.hold_blocks(engine.scheduler.get("a"))
    assert engine.release_prompt_kv("a")  # not finished: it stops holding
    engine.step()
    engine.assert_no_leaks()


def test_gathered_prompt_kv_is_each_layers_blocks_in_order(llama_dir: Path) -> None:
    engine = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=8, max_model_len=128))
    for k, v in engine.kv_caches:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    kv = gather_prompt_kv(engine.attention, engine.kv_caches, torch.tensor([5, 1, 6]))
    assert kv.shape == (engine.model_config.num_layers, 2, 3, *engine.kv_caches[0][0].shape[1:])
    for layer, (k, v) in enumerate(engine.kv_caches):
        assert torch.equal(kv[layer, 0], k[[5, 1, 6]]) and torch.equal(kv[layer, 1], v[[5, 1, 6]])


@pytest.mark.parametrize(
    ("layer_nbytes", "run_nbytes", "runs"),
    [
        (10, 30, [(0, 3), (3, 1)]),  # 4 layers: a run of 3, then the last one alone
        (10, 1000, [(0, 4)]),  # a short prompt: one message
        (10, 5, [(0, 1), (1, 1), (2, 1), (3, 1)]),  # at least one layer a run
    ],
)
def test_layer_runs_cover_every_layer_once(layer_nbytes: int, run_nbytes: int, runs: list) -> None:
    assert layer_runs(4, layer_nbytes, run_nbytes) == runs


def test_reset_prefix_cache_forgets_the_cached_blocks(llama_dir: Path) -> None:
    prefill = EngineCore(EngineConfig(model=str(llama_dir)))
    prompt = list(range(50, 100))  # three full blocks, cached once prefilled
    shipped_prefill(prefill, "a", prompt, GREEDY)
    cached = prefill.stats().num_cached_blocks
    assert cached >= 3
    assert prefill.reset_prefix_cache() == cached
    assert prefill.stats().num_cached_blocks == 0
    _, again = shipped_prefill(prefill, "b", prompt, GREEDY)
    assert again.num_cached_tokens == 0  # a cold cache: nothing to reuse
    prefill.assert_no_leaks()


def test_allocator_summary_is_for_gpus_only(llama_dir: Path) -> None:
    assert EngineCore(EngineConfig(model=str(llama_dir))).allocator_summary() is None
