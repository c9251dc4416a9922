"""Malformed or unsupported model directories fail with a message naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from baton import LLM
from baton.shared.models.model_config import ModelDirectoryError


@pytest.fixture
def copy_of(llama_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    return target


def edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match=r"config.json not found"):
        LLM(str(tmp_path))


def test_unsupported_architecture_is_named(copy_of: Path) -> None:
    edit_config(copy_of, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelDirectoryError, match="unsupported architecture GPT2LMHeadModel; Baton serves"):
        LLM(str(copy_of))


def test_invalid_json(copy_of: Path) -> None:
    (copy_of / "config.json").write_text("{ not json")
    with pytest.raises(ModelDirectoryError, match=r"config.json is not valid JSON"):
        LLM(str(copy_of))


def test_missing_required_field(copy_of: Path) -> None:
    config = json.loads((copy_of / "config.json").read_text())
    del config["hidden_size"]
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="'hidden_size' is missing"):
        LLM(str(copy_of))


def test_unsupported_rope_scaling(copy_of: Path) -> None:
    edit_config(copy_of, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ModelDirectoryError, match="rope scaling type 'longrope' is not supported"):
        LLM(str(copy_of))


def test_no_weights(copy_of: Path) -> None:
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(ModelDirectoryError, match=r"has no weights: expected model\.safetensors"):
        LLM(str(copy_of))


def test_missing_tensor_is_named(copy_of: Path) -> None:
    weights = load_file(copy_of / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, copy_of / "model.safetensors")
    with pytest.raises(
        ModelDirectoryError, match=r"missing tensors: model\.layers\.2\.self_attn\.k_proj\.weight"
    ):
        LLM(str(copy_of))


def test_unexpected_tensor_is_named(copy_of: Path) -> None:
    weights = load_file(copy_of / "model.safetensors")
    weights["model.layers.0.mystery.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, copy_of / "model.safetensors")
    with pytest.raises(ModelDirectoryError, match=r"unexpected tensors: model\.layers\.0\.mystery\.weight"):
        LLM(str(copy_of))


def test_shape_mismatch_is_named(copy_of: Path) -> None:
    edit_config(copy_of, intermediate_size=512)
    with pytest.raises(
        ModelDirectoryError,
        match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\), but the config",
    ):
        LLM(str(copy_of))


def test_corrupt_safetensors(copy_of: Path) -> None:
    (copy_of / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelDirectoryError, match="cannot read"):
        LLM(str(copy_of))


def test_index_naming_a_missing_shard(copy_of: Path) -> None:
    (copy_of / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelDirectoryError, match=r"missing: model-00002-of-00002\.safetensors"):
        LLM(str(copy_of))
