"""The demo model generator: complete, deterministic, the advertised shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from baton.shared.demo.tiny_model import write_tiny_model

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_directory_is_complete_and_gqa(llama_dir: Path) -> None:
    assert sorted(p.name for p in llama_dir.iterdir()) == sorted(FILES)
    config = json.loads((llama_dir / "config.json").read_text())
    assert config["num_attention_heads"] == 8 and config["num_key_value_heads"] == 2
    assert config["num_hidden_layers"] >= 4
    params = sum(t.numel() for t in load_file(llama_dir / "model.safetensors").values())
    assert 1_000_000 < params < 10_000_000
    tok_config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config and tok_config["eos_token"] == "</s>"


def test_same_seed_same_bytes(tmp_path: Path, llama_dir: Path) -> None:
    again = write_tiny_model(tmp_path / "again", "llama", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (llama_dir / name).read_bytes(), name


def test_other_seed_other_weights(tmp_path: Path, llama_dir: Path) -> None:
    other = write_tiny_model(tmp_path / "other", "llama", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (llama_dir / "model.safetensors").read_bytes()


def test_architectures_differ_as_advertised(model_dirs: dict[str, Path]) -> None:
    configs = {a: json.loads((d / "config.json").read_text()) for a, d in model_dirs.items()}
    assert (
        configs["llama"]["rope_scaling"]["rope_type"] == "llama3" and configs["llama"]["tie_word_embeddings"]
    )
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(model_dirs["qwen2"] / "model.safetensors")
    assert configs["mistral"]["sliding_window"] < 400


def test_refuses_a_non_empty_directory(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        write_tiny_model(llama_dir, "llama")


def test_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        write_tiny_model(tmp_path / "x", "gpt2")
