"""Triton kernels for the GPU path, each beside a pure-torch reference of the same function."""

from baton.kernels.paged_decode import paged_decode_attention, paged_decode_attention_reference

__all__ = ["paged_decode_attention", "paged_decode_attention_reference"]
