"""Building a model from a Hugging Face model directory, in the dtype and on the device asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from baton.shared.engine.attention import AttentionBackend
from baton.shared.models.llama import LlamaForCausalLM
from baton.shared.models.model_config import ModelConfig
from baton.shared.models.weights import init_dummy_weights, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, config: ModelConfig) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 when it names none)."""
    name = (config.torch_dtype or "float32") if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def load_model(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    max_positions: int,
    load_format: str = "auto",
) -> LlamaForCausalLM:
    """Build the model for `config` directly on `device` in `dtype` and fill it from the checkpoint
    (`load_format` "auto"), or with seeded random weights ("dummy": no checkpoint needed, for benchmarks)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty() gives each parameter its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, Path(model_dir))
    model.init_rope(max_positions, device)
    return model.eval().requires_grad_(False)
