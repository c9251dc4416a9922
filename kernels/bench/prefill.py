"""Varlen prefill attention over the paged cache against SDPA's flash backend on equal shapes
(B sequences of L new tokens, causal, 32 query heads, 8 KV heads, head_dim 128, bf16, block 16).
SDPA reads contiguous K/V; ours reads them through shuffled block tables. A second row per shape
puts half of each sequence in a cached prefix (chunked prefill / prefix hit), which SDPA cannot do."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from baton.kernels.bench.decode import DecodeShape, paged_caches
from baton.kernels.bench.timing import median_ms, relative_error
from baton.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_reference


def bench_prefill(batch: int, length: int, shape: DecodeShape, gen: torch.Generator) -> list[dict[str, Any]]:
    """Rows for (batch, length): no prefix, with SDPA flash as baseline; then half of it cached."""
    full = _make_inputs(batch, length, 0, shape, gen)
    ms = median_ms(partial(_ours, shape=shape), [full])
    baseline, gqa = _flash_baseline(batch, length, shape, gen)
    flops = 2 * 2 * batch * shape.q_heads * shape.head_dim * length * (length + 1) / 2  # causal QK^T + PV
    rows = [
        _row(batch, length, 0, ms, flops, _check(full, shape))
        | {"baseline_ms": baseline, "speedup": baseline / ms, "baseline_gqa": gqa}
    ]
    half = length // 2
    cached = _make_inputs(batch, length, half, shape, gen)
    ms = median_ms(partial(_ours, shape=shape), [cached])
    new = length - half
    flops = 2 * 2 * batch * shape.q_heads * shape.head_dim * new * (half + (new + 1) / 2)
    rows.append(_row(batch, length, half, ms, flops, _check(cached, shape)))
    torch.cuda.empty_cache()
    return rows


def _row(batch: int, length: int, prefix: int, ms: float, flops: float, error: float) -> dict[str, Any]:
    return {
        "batch": batch,
        "len": length,
        "cached_prefix": prefix,
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "rel_err": error,
    }


def _make_inputs(
    batch: int, length: int, prefix: int, shape: DecodeShape, gen: torch.Generator
) -> tuple[Any, ...]:
    """Queries for the last length - prefix tokens of each sequence; all keys already in the cache."""
    new = length - prefix
    k, v, tables, lens = paged_caches(batch, length, shape, gen)
    starts = torch.arange(0, (batch + 1) * new, new, device="cuda", dtype=torch.int32)
    q = torch.randn(
        batch * new, shape.q_heads, shape.head_dim, device="cuda", dtype=shape.dtype, generator=gen
    )
    return q, k, v, tables, starts, lens, new


def _ours(q, k, v, tables, starts, lens, max_query_len, shape: DecodeShape) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return paged_prefill_attention(q, k, v, tables, starts, lens, shape.head_dim**-0.5, max_query_len)


def _check(inputs: tuple[Any, ...], shape: DecodeShape) -> float:
    """Error of the first two sequences against the torch reference."""
    q, k, v, tables, starts, lens, new = inputs
    got = _ours(q, k, v, tables, starts, lens, new, shape)[: 2 * new]
    want = paged_prefill_attention_reference(
        q[: 2 * new], k, v, tables[:2], starts[:3], lens[:2], shape.head_dim**-0.5, new
    )
    return relative_error(got, want)


def _flash_baseline(batch: int, length: int, shape: DecodeShape, gen: torch.Generator) -> tuple[float, bool]:
    """SDPA restricted to the flash backend on contiguous [B, H, L, D]; GQA natively if it accepts it,
    else with K/V expanded to every query head (outside the timing)."""
    q = torch.randn(
        batch, shape.q_heads, length, shape.head_dim, device="cuda", dtype=shape.dtype, generator=gen
    )
    k = torch.randn(
        batch, shape.kv_heads, length, shape.head_dim, device="cuda", dtype=shape.dtype, generator=gen
    )
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return median_ms(
                partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True), [(q, k, v)]
            ), True
        except RuntimeError:
            group = shape.q_heads // shape.kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return median_ms(partial(F.scaled_dot_product_attention, is_causal=True), [(q, k, v)]), False
