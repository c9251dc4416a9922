"""Rotary frequencies against transformers' own rope initialisation functions."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from baton.shared.models.model_config import ModelConfig
from baton.shared.models.rope import inverse_frequencies

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "vocab_size": 32,
    "max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        {"type": "linear", "factor": 4.0},  # the older key
    ],
)
def test_scaled_frequencies_match_transformers(rope_scaling: dict) -> None:
    raw = {**BASE, "rope_theta": 500000.0, "rope_scaling": rope_scaling}
    ours = ModelConfig.from_dict(raw)
    hf_config = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    rope_type = hf_config.rope_parameters["rope_type"]
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    got = inverse_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_default_frequencies() -> None:
    got = inverse_frequencies(64, 10000.0, None)
    expected = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_transformers5_rope_parameters_spelling() -> None:
    old = ModelConfig.from_dict(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    )
    new = ModelConfig.from_dict(
        {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    )
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling)
