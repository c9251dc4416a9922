"""Attention backends behind one metadata struct: `torch` (reference) now, `triton` (GPU) later."""

from baton.shared.engine.attention.backend import AttentionBackend, AttentionLayerSpec, get_attention_backend
from baton.shared.engine.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionLayerSpec", "AttentionMetadata", "get_attention_backend"]
