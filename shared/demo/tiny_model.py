"""Generates small models in the real Hugging Face format: random weights on a real architecture and
a byte-level BPE tokenizer trained locally on the public-domain corpus shipped beside this file.

Deterministic for a seed. The same loading code then serves these and real checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from baton.shared.demo import ARCHITECTURES

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
TOKENIZER_VOCAB = 2048
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Shapes shared by all architectures: ~3-5M parameters, GQA with 8 query heads over 2 KV heads.
_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
}
# What makes each architecture itself (Llama 3.2: llama3 rope scaling, tied embeddings;
# Qwen2.5: qkv bias; Mistral: sliding-window attention).
_ARCH = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 4,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "sliding_window": 96,
    },
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_tiny_model(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", num_shards: int = 1
) -> Path:
    """Write a complete model directory (config, weights, tokenizer, templates) to `out_dir`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        tokenizer = train_tokenizer()
        tokenizer.save(str(staging / "tokenizer.json"))
        ids = {t: _token_id(tokenizer, t) for t in SPECIAL_TOKENS}
        config = {
            **_ARCH[arch],
            **_SHAPE,
            "vocab_size": tokenizer.get_vocab_size(),
            "torch_dtype": dtype,
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
        }
        _write_json(staging / "config.json", config)
        _write_json(
            staging / "generation_config.json",
            {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[IM_END]], "pad_token_id": ids[EOS]},
        )
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(ids))
        _save_weights(staging, random_weights(config, seed, _DTYPES[dtype]), num_shards)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def corpus_text() -> str:
    """The shipped public-domain corpus, without its header comment."""
    text = resources.files("baton.shared.demo").joinpath("corpus.txt").read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2/Llama-3 style) that adds BOS to every encoded prompt."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"trained tokenizer lacks the special token {token!r}")
    return token_id


def random_weights(config: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under Hugging Face names. Scales are chosen so that the next token depends
    on the context (the layers outweigh the token's own embedding: no endless repeats) while the
    distribution stays peaked (top-1 probability ~0.4); norms and biases are non-trivial so a
    loading bug shows."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def linear(out_features: int, in_features: int, gain: float = 1.6) -> torch.Tensor:
        return normal(out_features, in_features, std=gain / math.sqrt(in_features))

    def norm() -> torch.Tensor:
        return (1.0 + torch.randn(hidden, generator=gen) * 0.1).to(dtype)

    w = {"model.embed_tokens.weight": normal(vocab, hidden, std=0.25)}
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm()
        w[f"{p}.self_attn.q_proj.weight"] = linear(q_size, hidden)
        w[f"{p}.self_attn.k_proj.weight"] = linear(kv_size, hidden)
        w[f"{p}.self_attn.v_proj.weight"] = linear(kv_size, hidden)
        w[f"{p}.self_attn.o_proj.weight"] = linear(hidden, q_size, gain=3.2)
        if qkv_bias:
            for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
                w[f"{p}.self_attn.{name}.bias"] = normal(size, std=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = norm()
        w[f"{p}.mlp.gate_proj.weight"] = linear(inter, hidden)
        w[f"{p}.mlp.up_proj.weight"] = linear(inter, hidden)
        w[f"{p}.mlp.down_proj.weight"] = linear(hidden, inter, gain=3.2)
    w["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(vocab, hidden, std=0.25)
    return w


def _save_weights(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(weights)
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per_shard = math.ceil(len(names) / num_shards)
    weight_map = {}
    for k in range(num_shards):
        shard_name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[k * per_shard : (k + 1) * per_shard]
        save_file({n: weights[n] for n in chunk}, str(out / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard_name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": _SHAPE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
