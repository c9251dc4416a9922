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
from baton.shared.engine.scheduler import SampledToken

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 180))]


def shipped_prefill(prefill: EngineCore, request_id: str, prompt: list[int], params: SamplingParams):
    layers: dict[int, torch.Tensor] = {}
    prefill.layer_kv_run_bytes = 1  # a run per layer here; test_exported_runs covers longer ones

    def sink(rid: str, first: int, kv: torch.Tensor, ready: Any) -> None:
        layers.update({first + i: kv[i].clone() for i in range(kv.shape[0])})

    prefill.layer_kv_sink = sink
    prefill.add_request(request_id, prompt, params, prefill_only=True)
    outputs = []
    while prefill.has_unfinished():
        outputs += prefill.step()
    (out,) = outputs
    assert out.finished and len(out.new_token_ids) == 1
    return layers, out


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


def test_exported_runs_cover_every_layer_once_in_runs_of_the_asked_size(llama_dir: Path) -> None:
    prompt = list(range(3, 40))  # 37 tokens: 3 blocks of 16
    per_layer, _ = shipped_prefill(EngineCore(EngineConfig(model=str(llama_dir))), "a", prompt, GREEDY)
    engine = EngineCore(EngineConfig(model=str(llama_dir)))
    layer_bytes = per_layer[0].numel() * per_layer[0].element_size()
    engine.layer_kv_run_bytes = 3 * layer_bytes  # 4 layers: a run of 3, then the last one alone
    runs: list[tuple[int, torch.Tensor]] = []
    engine.layer_kv_sink = lambda rid, first, kv, ready: runs.append((first, kv.clone()))
    engine.add_request("b", prompt, GREEDY, prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    assert [(first, kv.shape[0]) for first, kv in runs] == [(0, 3), (3, 1)]
    assert torch.equal(torch.cat([kv for _, kv in runs]), torch.stack([per_layer[i] for i in range(4)]))
    engine.assert_no_leaks()


def test_prompts_shipped_in_one_step_keep_their_own_runs(llama_dir: Path) -> None:
    """Each layer is one copy for every prompt a step ships; each prompt's runs are sized for it."""
    prompts = {"long": list(range(3, 40)), "short": [7, 8, 9]}  # 3 blocks and 1 block
    per_layer = {
        rid: shipped_prefill(EngineCore(EngineConfig(model=str(llama_dir))), rid, p, GREEDY)[0]
        for rid, p in prompts.items()
    }
    engine = EngineCore(EngineConfig(model=str(llama_dir)))
    long_layer = per_layer["long"][0]
    engine.layer_kv_run_bytes = 3 * long_layer.numel() * long_layer.element_size()
    runs: dict[str, list[tuple[int, torch.Tensor]]] = {rid: [] for rid in prompts}
    engine.layer_kv_sink = lambda rid, first, kv, ready: runs[rid].append((first, kv.clone()))
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY, prefill_only=True)
    assert len(engine.step()) == 2  # both prompts in one step
    num_layers = engine.model_config.num_layers
    assert [(first, kv.shape[0]) for first, kv in runs["long"]] == [(0, 3), (3, num_layers - 3)]
    assert [(first, kv.shape[0]) for first, kv in runs["short"]] == [(0, num_layers)]  # 9 layers' worth
    for rid in prompts:
        got = torch.cat([kv for _, kv in runs[rid]])
        # batched with another prompt, the same values up to float rounding; a misplaced block would not be
        torch.testing.assert_close(got, torch.stack([per_layer[rid][i] for i in range(num_layers)]))
    engine.assert_no_leaks()


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
