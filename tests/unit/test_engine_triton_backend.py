"""The engine with the `triton` attention backend gives the torch backend's tokens. Without CUDA the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py), so this tier
covers the backend's wiring (decodes first, prefill chunks after, cached prefixes, chunked prefill,
sliding windows) on every CI run; tests/gpu repeats it on the real kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from baton import LLM, SamplingParams
from baton.shared.engine.attention import resolve_backend_name

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SHARED = list(range(40, 75))  # 35 tokens: two full blocks of 16 are cached for the second prompt


def prompts() -> list[list[int]]:
    return [
        [*SHARED, 7, 8, 9],
        [5, 6],
        [*SHARED, 11],
        list(range(100, 210)),
    ]  # past mistral's 96-token window


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_triton_backend_gives_the_torch_backend_tokens(model_dirs: dict[str, Path], arch: str) -> None:
    # a 32-token step budget chunks the 110-token prompt and mixes decodes with prefill chunks
    engine_args = dict(dtype="float32", device="cpu", max_num_batched_tokens=32, block_size=16)
    want = LLM(str(model_dirs[arch]), attention_backend="torch", **engine_args).generate(prompts(), GREEDY)
    llm = LLM(str(model_dirs[arch]), attention_backend="triton", **engine_args)
    got = llm.generate(prompts(), GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.stats().prefix_hit_tokens >= 32
    llm.engine.assert_no_leaks()


def test_auto_picks_triton_only_on_cuda() -> None:
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
    assert resolve_backend_name("auto", torch.device("cuda")) == "triton"
    assert resolve_backend_name("torch", torch.device("cuda")) == "torch"


def test_triton_off_cuda_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend_name("triton", torch.device("cpu"))


def test_warm_up_runs_every_path_and_writes_nothing(model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(model_dirs["mistral"]), attention_backend="triton", device="cpu", max_num_batched_tokens=24)
    before = [(k.clone(), v.clone()) for k, v in llm.engine.kv_caches]
    llm.engine._warm_up()  # runs at start on CUDA; here in the interpreter
    for (k, v), (k0, v0) in zip(llm.engine.kv_caches, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    llm.engine.assert_no_leaks()
