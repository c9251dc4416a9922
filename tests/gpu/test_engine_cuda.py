"""The engine on a CUDA device: same tokens as transformers on the same card (float32), and sane in
bfloat16. Skipped without CUDA; run through the device tool."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)


def prompts(n: int = 12) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(4, 2000) for _ in range(rng.randrange(1, 300))] for _ in range(n)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_cuda_float32_matches_transformers(model_dirs: dict[str, Path], arch: str, backend: str) -> None:
    model_dir = model_dirs[arch]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    hf.generation_config.eos_token_id = None
    llm = LLM(
        str(model_dir), device="cuda", dtype="float32", max_num_batched_tokens=256, attention_backend=backend
    )
    outputs = llm.generate(prompts(), GREEDY)
    for prompt, out in zip(prompts(), outputs, strict=True):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False, pad_token_id=0
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()
    llm.engine.assert_no_leaks()
    assert llm.engine.stats().num_held_blocks == 0


def test_cuda_bfloat16_tracks_float32(llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    ref = LLM(str(llama_dir), device="cuda", dtype="float32").generate(prompts(8), params)
    half = LLM(str(llama_dir), device="cuda", dtype="bfloat16").generate(prompts(8), params)
    for a, b in zip(ref, half, strict=True):
        # bf16 may swap near-ties, but its pick is among float32's top 5 with a close probability
        token = b.token_ids[0]
        assert token in a.logprobs[0]
        assert abs(a.logprobs[0][token].logprob - b.logprobs[0][token].logprob) < 0.25


def test_cuda_picks_the_triton_backend(llama_dir: Path) -> None:
    assert LLM(str(llama_dir), device="cuda").engine.attention_backend == "triton"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_backend_is_as_close_to_float32_as_torch(llama_dir: Path, dtype: str) -> None:
    """In 16 bits both backends round differently, so neither is the reference: each is compared with
    float32 over mixed batches (decodes beside chunked prefills, prefix hits), and the triton backend's
    error must not exceed the torch backend's by more than noise."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    shared = prompts(1)[0][:200]
    batch = [shared + p[:50] for p in prompts(6)] + prompts(6)

    def run(backend: str, run_dtype: str) -> list:
        llm = LLM(
            str(llama_dir),
            device="cuda",
            dtype=run_dtype,
            attention_backend=backend,
            max_num_batched_tokens=128,
        )
        return llm.generate(batch, params)

    ref = run("torch", "float32")
    errors = {backend: logprob_errors(ref, run(backend, dtype)) for backend in ("torch", "triton")}
    assert len(errors["triton"]) >= len(batch)  # at least the first token of every prompt compared
    mean = {backend: sum(e) / len(e) for backend, e in errors.items()}
    assert mean["triton"] <= 1.5 * mean["torch"] + 0.02, mean


def logprob_errors(ref: list, got: list) -> list[float]:
    """|logprob difference| of float32's chosen token, at every step where the runs still agree."""
    errors = []
    for want, have in zip(ref, got, strict=True):
        for step, token in enumerate(want.token_ids):
            if token not in have.logprobs[step]:
                errors.append(10.0)  # float32's choice fell out of the top 5: a large error
                break
            errors.append(abs(want.logprobs[step][token].logprob - have.logprobs[step][token].logprob))
            if have.token_ids[step] != token:
                break  # the runs diverge from here on
    return errors


def test_allocator_summary_counts_the_engines_device_memory(llama_dir: Path) -> None:
    engine = LLM(str(llama_dir), device="cuda").engine
    summary = engine.allocator_summary()
    assert summary is not None
    found = re.fullmatch(
        r"peak reserved ([\d.]+) GiB, (\d+) device allocations, (\d+) frees, (\d+) retries", summary
    )
    assert found, summary
    assert float(found[1]) >= round(torch.cuda.max_memory_reserved() / 2**30, 1) - 0.1
    assert int(found[2]) >= 1  # the KV cache at least


def test_async_scheduling_on_cuda_gives_the_same_tokens(llama_dir: Path) -> None:
    # continued decode steps replay the CUDA graphs with input ids taken from the device; the tokens
    # are read through pinned memory without waiting for the step queued after them
    lengths = [5, 40, 17, 64, 9, 33, 2, 48, 21, 12, 57, 30]
    plain = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    # two engines at once: each a fixed cache, not one sized from the memory the other left
    engine = dict(device="cuda", dtype="float32", attention_backend="triton", num_kv_blocks=1024)
    one_at_a_time = LLM(str(llama_dir), async_scheduling=False, **engine)
    expected = [o.token_ids for o in one_at_a_time.generate(prompts(), plain)]
    # and requests stopped by a token found one step late
    stops = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, stop_token_ids=[want[n // 2]])
        for n, want in zip(lengths, expected, strict=True)
    ]
    stopped = [o.token_ids for o in one_at_a_time.generate(prompts(), stops)]
    llm = LLM(str(llama_dir), async_scheduling=True, **engine)
    assert [o.token_ids for o in llm.generate(prompts(), plain)] == expected
    assert [o.token_ids for o in llm.generate(prompts(), stops)] == stopped
    assert llm.engine.num_continued_steps > 50
    llm.engine.assert_no_leaks()
