"""The offline API: seeded sampling, input validation, text and chat, odd model directories."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch

from baton import LLM, SamplingParams
from baton.shared.demo.tiny_model import write_tiny_model
from baton.shared.models.loader import DTYPES


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir))


SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
PROMPT = "It is a truth universally acknowledged"


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    first = llm.generate(PROMPT, SEEDED)[0].token_ids
    again = llm.generate(PROMPT, SEEDED)[0].token_ids
    assert first == again
    other = llm.generate(PROMPT, SamplingParams(**{**SEEDED.__dict__, "seed": 43}))[0].token_ids
    assert other != first


def test_seeded_sampling_is_independent_of_batch_composition(llm: LLM, llama_dir: Path) -> None:
    alone = llm.generate(PROMPT, SEEDED)[0].token_ids
    crowd_prompts = ["Call me Ishmael.", PROMPT, "The", "Whan that Aprille " * 30, PROMPT]
    crowd_params = [
        SamplingParams(max_tokens=30, temperature=1.0),
        SEEDED,
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=40, temperature=0.7, top_k=5, seed=1),
        SamplingParams(max_tokens=24, temperature=1.3, seed=42 + 1, ignore_eos=True),
    ]
    assert llm.generate(crowd_prompts, crowd_params)[1].token_ids == alone
    # the same under chunked prefill and a KV budget that forces preemption
    tight = LLM(str(llama_dir), num_kv_blocks=14, max_model_len=224, max_num_batched_tokens=8)
    assert tight.generate(crowd_prompts, crowd_params)[1].token_ids == alone
    assert tight.engine.stats().num_preemptions > 0
    tight.engine.assert_no_leaks()


def test_text_prompts_and_outputs(llm: LLM) -> None:
    [out] = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    tok = llm.get_tokenizer()
    assert out.prompt == "Once upon a time"
    assert out.prompt_token_ids == tok.encode("Once upon a time")
    assert out.prompt_token_ids[0] == tok.token_to_id("<s>")  # BOS added, as transformers does
    assert out.text == tok.decode(out.token_ids) and out.text
    assert out.outputs[0].text == out.text  # vLLM's shape works too
    assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_logprobs_carry_top_alternatives(llm: LLM) -> None:
    [out] = llm.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    )
    assert len(out.logprobs) == 4
    for token_id, position in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in position and position[token_id].rank == 1  # greedy: the top token
        ranked = sorted(position.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in itertools.pairwise(ranked))
        assert ranked[0].decoded_token is not None


def test_stop_token_ids_end_generation(llm: LLM) -> None:
    [free] = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[3]
    [stopped] = llm.generate(
        [[9, 10, 11]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    )
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_at


def test_min_tokens_holds_back_stop_tokens(llm: LLM) -> None:
    [free] = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[0]
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at], min_tokens=3)
    [out] = llm.generate([[9, 10, 11]], params)
    assert stop_at not in out.token_ids[:3]


def test_chat_uses_the_model_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello!"}]
    [out] = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))
    text = llm.get_tokenizer().decode(out.prompt_token_ids, skip_special_tokens=False)
    assert text == "<s><|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([1] * 3000, SamplingParams(), "longer than the model allows"),
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ([1, 2, 10**6], SamplingParams(), "token id 1000000 at position 2 is outside the vocabulary"),
        ([1, -1], SamplingParams(), "outside the vocabulary"),
        ([1, True], SamplingParams(), "token id True at position 1 is outside the vocabulary"),
        ([1, 2.0], SamplingParams(), "token id 2.0 at position 1 is outside the vocabulary"),
        ([1, "7"], SamplingParams(), "token id '7' at position 1 is outside the vocabulary"),
        ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_prompts_raise_value_error(
    llm: LLM, prompt: object, params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2, 3], prompt], params)
    llm.engine.assert_no_leaks()  # the good prompt before it was not queued either


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ],
)
def test_bad_sampling_params_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_list_must_match_prompts(llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()])


def test_bad_engine_settings_raise_value_error(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        LLM(str(llama_dir), no_such_option=1)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(llama_dir), block_size=0)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(str(llama_dir), num_kv_blocks=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(str(llama_dir), max_model_len=10**6)


def test_model_without_tokenizer_serves_token_ids(llama_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(llama_dir / name, bare / name)
    llm = LLM(str(bare))
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("some text")


def test_sharded_checkpoint_matches_single_file(llama_dir: Path, tmp_path: Path) -> None:
    sharded = write_tiny_model(tmp_path / "sharded", "llama", seed=0, num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    a = LLM(str(llama_dir)).generate([[3, 4, 5, 6]], params)[0]
    b = LLM(str(sharded)).generate([[3, 4, 5, 6]], params)[0]
    assert a.token_ids == b.token_ids
    assert [p[t].logprob for p, t in zip(a.logprobs, a.token_ids, strict=True)] == [
        p[t].logprob for p, t in zip(b.logprobs, b.token_ids, strict=True)
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(llama_dir: Path, dtype: str) -> None:
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    prompt = [[3, 4, 5, 6, 7, 8, 9, 10]]
    ref = LLM(str(llama_dir), dtype="float32").generate(prompt, params)[0]
    half = LLM(str(llama_dir), dtype=dtype)
    assert half.engine.dtype == DTYPES[dtype]
    out = half.generate(prompt, params)[0]
    assert out.token_ids == ref.token_ids
    token = ref.token_ids[0]
    assert out.logprobs[0][token].logprob == pytest.approx(ref.logprobs[0][token].logprob, abs=0.1)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "bf16", "qwen2", seed=1, dtype="bfloat16")
    llm = LLM(str(model_dir), dtype="float32")
    assert llm.engine.dtype == torch.float32
    assert LLM(str(model_dir)).engine.dtype == torch.bfloat16  # 'auto' keeps the checkpoint's
    [out] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 2
