"""The attention backend interface and its registry."""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from baton.shared.engine.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionLayerSpec:
    """What a backend needs to know about one attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    """Each query sees at most this many keys (itself included); None: the whole prefix."""


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache, then attends each query to its sequence's keys.

    Caches: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    """

    name: str
    fused_layers: bool = False
    """The model also runs Baton's fused Triton norm, rope and activation kernels."""

    def forward(
        self,
        layer: AttentionLayerSpec,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(layer, q, k_cache, v_cache, meta)

    @abstractmethod
    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    @abstractmethod
    def gather_blocks(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_ids: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [2, len(block_ids), block_size, num_kv_heads, head_dim], K then V
        """Copy whole blocks out of the cache (a prefill worker's KV push), into `out` if given
        (contiguous, of the result's shape and dtype)."""

    @abstractmethod
    def scatter_blocks(
        self, kv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> None:
        """Copy gather_blocks' layout back into the cache (a decode worker receiving a push)."""

    @abstractmethod
    def attend(
        self,
        layer: AttentionLayerSpec,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...


BACKEND_NAMES = ("torch", "triton")


def get_attention_backend(name: str) -> AttentionBackend:
    """`torch` (reference, any device) or `triton` (CUDA; on CPU only under TRITON_INTERPRET=1).
    Unknown names raise ValueError listing the known ones."""
    if name == "torch":
        from baton.shared.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from baton.shared.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKEND_NAMES)}")


def resolve_backend_name(requested: str, device: torch.device) -> str:
    """`auto` is `triton` on CUDA when Triton is installed, else `torch`. An explicit `triton` off CUDA
    is refused unless TRITON_INTERPRET=1 (Triton's CPU interpreter: slow, for tests)."""
    if requested == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if requested == "triton":
        if not _triton_installed():
            raise ValueError("attention backend 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"attention backend 'triton' needs a CUDA device, the engine runs on {device.type} "
                "(use 'torch', or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
            )
    return requested


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
