"""The engine's one validated configuration (frozen; unknown or out-of-range settings raise ValueError)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Everything an engine (offline LLM, prefill or decode worker) is built from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Path of a Hugging Face model directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations dtype; 'auto' takes the checkpoint's."
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV blocks to allocate; None sizes the cache from memory (see below)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="On CUDA: fraction of the card's memory Baton may use in all."
    )
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0, description="On CPU: most memory the KV cache may take, in GiB."
    )
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one step; prompts are chunked to fit."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most requests decoding together.")
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + output); None: the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV of identical prompt prefixes across requests."
    )
    attention_backend: Literal["auto", "torch"] = Field("auto", description="Attention implementation.")
    seed: int = Field(0, description="Seed of the sampler's generator for requests without their own seed.")
