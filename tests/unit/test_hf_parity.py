"""Baton's engine against Hugging Face transformers on the same generated checkpoints, token for token.

One reference per architecture (transformers `generate`, one prompt at a time, no padding); every
engine configuration that changes *how* tokens are computed (prefix cache, chunked prefill,
preemption, aborts) must reproduce it exactly, and leave every block free or cached.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from baton import LLM, SamplingParams
from baton.shared.engine.request import RequestStatus

LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 64, 100, 129, 200, 311, 400]
MAX_TOKENS = 20
LOGPROB_TOL = 1e-4
SHARED_PREFIX = 48  # prompts of 64+ tokens share their first 48 tokens


@dataclass(frozen=True)
class Reference:
    model_dir: Path
    prompts: list[list[int]]
    token_ids: list[list[int]]
    logprobs: list[list[float]]


def make_prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    prefix = [rng.randrange(4, vocab_size) for _ in range(SHARED_PREFIX)]
    prompts = []
    for i, n in enumerate(LENGTHS):
        body = [rng.randrange(4, vocab_size) for _ in range(n)]
        prompts.append(prefix + body[SHARED_PREFIX:] if n >= 64 and i % 2 else body)
    return prompts


@torch.inference_mode()
def transformers_greedy(
    model_dir: Path, prompts: list[list[int]]
) -> tuple[list[list[int]], list[list[float]]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    tokens, logprobs = [], []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        generated = out.sequences[0, len(prompt) :].tolist()
        tokens.append(generated)
        logprobs.append(
            [
                torch.log_softmax(step[0].float(), dim=-1)[t].item()
                for step, t in zip(out.logits, generated, strict=True)
            ]
        )
    return tokens, logprobs


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def reference(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> Reference:
    model_dir = model_dirs[request.param]
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    prompts = make_prompts(vocab)
    tokens, logprobs = transformers_greedy(model_dir, prompts)
    return Reference(model_dir, prompts, tokens, logprobs)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)


def assert_matches(ref: Reference, outputs: list, skip: frozenset[int] = frozenset()) -> None:
    for i, out in enumerate(outputs):
        if i in skip:
            continue
        assert out.token_ids == ref.token_ids[i], f"prompt {i} ({len(ref.prompts[i])} tokens) diverged"
        ours = [pos[t].logprob for pos, t in zip(out.logprobs, out.token_ids, strict=True)]
        assert max(abs(a - b) for a, b in zip(ours, ref.logprobs[i], strict=True)) < LOGPROB_TOL


def assert_clean(llm: LLM) -> None:
    llm.engine.assert_no_leaks()
    assert llm.engine.stats().num_held_blocks == 0


def test_greedy_matches_transformers(reference: Reference) -> None:
    llm = LLM(str(reference.model_dir))
    outputs = llm.generate(reference.prompts, GREEDY)
    assert len(outputs) == len(LENGTHS) >= 16
    assert_matches(reference, outputs)
    assert all(o.finish_reason == "length" for o in outputs)
    assert [o.prompt_token_ids for o in outputs] == reference.prompts
    assert_clean(llm)


def test_prefix_cache_hits_give_the_same_tokens(reference: Reference) -> None:
    llm = LLM(str(reference.model_dir), enable_prefix_caching=True)
    llm.generate(reference.prompts, GREEDY)
    again = llm.generate(reference.prompts, GREEDY)  # every full prompt block is cached now
    assert_matches(reference, again)
    assert all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 16)
    assert_clean(llm)
    assert llm.engine.stats().num_cached_blocks > 0


def test_without_prefix_caching(reference: Reference) -> None:
    llm = LLM(str(reference.model_dir), enable_prefix_caching=False)
    llm.generate(reference.prompts, GREEDY)
    again = llm.generate(reference.prompts, GREEDY)
    assert_matches(reference, again)
    assert all(o.num_cached_tokens == 0 for o in again)
    assert_clean(llm)
    assert llm.engine.stats().num_cached_blocks == 0


def test_chunked_prefill_with_a_small_chunk(reference: Reference) -> None:
    llm = LLM(str(reference.model_dir), max_num_batched_tokens=7)
    assert_matches(reference, llm.generate(reference.prompts, GREEDY))
    assert_clean(llm)


def test_small_kv_budget_forces_preemption(reference: Reference) -> None:
    # 30 blocks of 16 hold one longest sequence (420 tokens) and little else.
    llm = LLM(str(reference.model_dir), num_kv_blocks=30, max_model_len=480, max_num_batched_tokens=64)
    outputs = llm.generate(reference.prompts, GREEDY)
    assert llm.engine.stats().num_preemptions > 0
    assert_matches(reference, outputs)
    assert_clean(llm)


def test_aborts_midway_leave_the_rest_intact(reference: Reference) -> None:
    llm = LLM(str(reference.model_dir), num_kv_blocks=40, max_model_len=480, max_num_batched_tokens=32)
    engine = llm.engine
    ids = [f"r{i}" for i in range(len(reference.prompts))]
    for rid, prompt in zip(ids, reference.prompts, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    finish: dict[str, str] = {}
    # abort requests at different stages: still waiting, part-way through prefill, early and late in
    # decode, and while preempted
    stages = {
        "waiting": lambda r: r.request_id == "r1",
        "prefilling": lambda r: r.request_id == "r16" and 0 < r.num_computed_tokens < r.num_prompt_tokens,
        "early decode": lambda r: r.request_id == "r5" and r.num_output_tokens >= 3,
        "late decode": lambda r: r.request_id == "r12" and r.num_output_tokens >= 10,
        "preempted": lambda r: r.status is RequestStatus.PREEMPTED,
    }
    aborted: dict[str, str] = {}
    while engine.has_unfinished():
        for stage, matches in list(stages.items()):
            victim = next(
                (r for r in list(engine.scheduler.waiting) + engine.scheduler.running if matches(r)), None
            )
            if victim is not None:
                for out in engine.abort_requests([victim.request_id]):
                    finish[out.request_id] = out.finish_reason
                aborted[stage] = victim.request_id
                del stages[stage]
                engine.check_integrity()
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert set(aborted) == {"waiting", "prefilling", "early decode", "late decode", "preempted"}
    for i, rid in enumerate(ids):
        if rid in aborted.values():
            assert finish[rid] == "abort"
            assert tokens[rid] == reference.token_ids[i][: len(tokens[rid])]
            assert len(tokens[rid]) < MAX_TOKENS
        else:
            assert finish[rid] == "length" and tokens[rid] == reference.token_ids[i]
    assert engine.stats().num_preemptions > 0
    assert_clean(llm)


def test_llama2_style_untied_with_attention_bias(llama_dir: Path, tmp_path: Path) -> None:
    """Llama 2 layout: default rope, untied lm_head, and `attention_bias` (which covers o_proj too)."""
    model_dir = tmp_path / "llama2"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["rope_scaling"]
    config.update(rope_theta=10000.0, tie_word_embeddings=False, attention_bias=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    weights = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    weights["lm_head.weight"] = torch.randn(weights["model.embed_tokens.weight"].shape, generator=gen) * 0.25
    for name in [
        n for n in weights if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
    ]:
        weights[name.replace(".weight", ".bias")] = torch.randn(weights[name].shape[0], generator=gen) * 0.1
    save_file(weights, model_dir / "model.safetensors")
    prompts = make_prompts(config["vocab_size"])[::3]
    tokens, logprobs = transformers_greedy(model_dir, prompts)
    outputs = LLM(str(model_dir)).generate(prompts, GREEDY)
    assert_matches(Reference(model_dir, prompts, tokens, logprobs), outputs)
