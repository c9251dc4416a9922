"""Attention backends behind one metadata struct: `torch` (reference) and `triton` (GPU)."""

from baton.shared.engine.attention.backend import (
    AttentionBackend,
    AttentionLayerSpec,
    get_attention_backend,
    resolve_backend_name,
)
from baton.shared.engine.attention.metadata import AttentionMetadata

__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "AttentionMetadata",
    "get_attention_backend",
    "resolve_backend_name",
]
