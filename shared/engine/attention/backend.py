"""The attention backend interface and its registry."""

from __future__ import annotations

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
    def attend(
        self,
        layer: AttentionLayerSpec,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...


def get_attention_backend(name: str) -> AttentionBackend:
    """`torch` (reference, any device). Unknown names raise ValueError listing the known ones."""
    from baton.shared.engine.attention.torch_backend import TorchAttentionBackend

    backends: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(backends))}")
    return backends[name]()
