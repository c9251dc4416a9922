"""Reading Hugging Face safetensors checkpoints (single file or sharded) into Baton's models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from baton.shared.models.llama import LlamaForCausalLM
from baton.shared.models.model_config import ModelDirectoryError, read_json

# Checkpoint tensors that carry nothing a model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirectoryError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelDirectoryError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelDirectoryError(
        f"{model_dir} has no weights: expected model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not supported)"
    )


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ModelDirectoryError(f"cannot read {path}: {exc}") from exc


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into the model (converting dtype); fails naming missing,
    unexpected or mis-shaped tensors."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_checkpoint_names(model, params)
    stacked = {f".{proj}.": (fused, shard) for fused, proj, shard in model.stacked_params()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_checkpoint(checkpoint_files(model_dir)):
        if name.endswith(_IGNORED_SUFFIXES) or (
            name == "lm_head.weight" and model.config.tie_word_embeddings
        ):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        _copy_into(model, params, stacked, name, tensor)
        loaded.add(name)
    missing = sorted(expected - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_some(sorted(unexpected))}")
        raise ModelDirectoryError(
            f"checkpoint in {model_dir} does not fit {model.config.architecture}: {'; '.join(parts)}"
        )


def _copy_into(
    model: LlamaForCausalLM,
    params: dict[str, torch.nn.Parameter],
    stacked: dict[str, tuple[str, int]],
    name: str,
    tensor: torch.Tensor,
) -> None:
    for marker, (fused, shard) in stacked.items():
        if marker in name:
            target_name = name.replace(marker, f".{fused}.")
            sizes = model.shard_sizes(fused)
            target = params[target_name].data.narrow(0, sum(sizes[:shard]), sizes[shard])
            break
    else:
        target = params[name].data
    if tuple(target.shape) != tuple(tensor.shape):
        raise ModelDirectoryError(
            f"tensor {name} has shape {tuple(tensor.shape)}, but the config implies {tuple(target.shape)}"
        )
    target.copy_(tensor)


def _expected_checkpoint_names(model: LlamaForCausalLM, params: dict[str, torch.nn.Parameter]) -> set[str]:
    """Checkpoint names the model needs: each fused parameter expands into its projections."""
    projections: dict[str, list[str]] = {}
    for fused, proj, _ in model.stacked_params():
        projections.setdefault(fused, []).append(proj)
    names = set()
    for name in params:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        fused = next((f for f in projections if f".{f}." in name), None)
        if fused is None:
            names.add(name)
        else:
            names.update(name.replace(f".{fused}.", f".{proj}.") for proj in projections[fused])
    return names


def _some(names: list[str], limit: int = 6) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place of a checkpoint: matrices and embeddings N(0, std), norm weights 1,
    biases 0, drawn on the model's device from `seed` (the same seed gives the same model)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
