"""Triton kernels for the GPU path, each beside a pure-torch reference of the same function."""

from baton.kernels.cache_ops import (
    gather_kv_blocks,
    gather_kv_blocks_reference,
    scatter_kv_blocks,
    scatter_kv_blocks_reference,
    store_kv,
    store_kv_reference,
)
from baton.kernels.fused import (
    NormedResidual,
    apply_rotary,
    apply_rotary_reference,
    rms_norm,
    rms_norm_reference,
    silu_and_mul,
    silu_and_mul_reference,
)
from baton.kernels.paged_decode import paged_decode_attention, paged_decode_attention_reference
from baton.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_reference

__all__ = [
    "NormedResidual",
    "apply_rotary",
    "apply_rotary_reference",
    "gather_kv_blocks",
    "gather_kv_blocks_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "scatter_kv_blocks",
    "scatter_kv_blocks_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "store_kv",
    "store_kv_reference",
]
