"""Paged decode attention against the torch baseline (gather the pages, then SDPA), on the issue's
shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, block 16, every sequence at full context."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from baton.kernels.bench.timing import copies_for, median_ms, relative_error
from baton.kernels.paged_decode import paged_decode_attention, paged_decode_attention_reference


@dataclass(frozen=True)
class DecodeShape:
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


def bench_decode(
    batch: int, ctx: int, copy_gbs: float, shape: DecodeShape, gen: torch.Generator
) -> dict[str, Any]:
    """One (batch, context) point: time, bandwidth, fraction of copy bandwidth, speed-up, error."""
    kv_bytes = 2 * batch * ctx * shape.kv_heads * shape.head_dim * shape.dtype.itemsize
    inputs = [_make_inputs(batch, ctx, shape, gen) for _ in range(copies_for(kv_bytes))]
    scale = shape.head_dim**-0.5
    q, k, v, tables, lens = inputs[0]
    check = slice(0, 4)
    want = paged_decode_attention_reference(q[check], k, v, tables[check], lens[check], scale)
    error = relative_error(paged_decode_attention(q, k, v, tables, lens, scale)[check], want)
    ms = median_ms(partial(paged_decode_attention, scale=scale), inputs)
    baseline_ms = median_ms(partial(_gather_sdpa, scale=scale), inputs)
    nbytes = kv_bytes + 2 * q.numel() * q.element_size()  # K, V read; q read, out written
    del inputs
    torch.cuda.empty_cache()
    return {
        "batch": batch,
        "ctx": ctx,
        "ms": ms,
        "gbs": nbytes / ms / 1e6,
        "frac_copy": nbytes / ms / 1e6 / copy_gbs,
        "baseline_ms": baseline_ms,
        "baseline_frac_copy": nbytes / baseline_ms / 1e6 / copy_gbs,
        "speedup": baseline_ms / ms,
        "rel_err": error,
    }


def paged_caches(
    batch: int, length: int, shape: DecodeShape, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K and V caches holding `batch` sequences of `length` tokens with their pages scattered
    (shuffled block tables), and their lengths."""
    pages = -(-length // shape.block_size)
    num_blocks = batch * pages
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    k = torch.randn(cache_shape, device="cuda", dtype=shape.dtype, generator=gen)
    v = torch.randn(cache_shape, device="cuda", dtype=shape.dtype, generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, pages).int()
    lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    return k, v, tables, lens


def _make_inputs(batch: int, ctx: int, shape: DecodeShape, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    k, v, tables, lens = paged_caches(batch, ctx, shape, gen)
    q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=shape.dtype, generator=gen)
    return q, k, v, tables, lens


def _gather_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The torch baseline: copy each sequence's pages out contiguously, then SDPA (all full length)."""
    b, kv_heads, head_dim = q.shape[0], k.shape[2], k.shape[3]
    keys = k[tables.long()].reshape(b, -1, kv_heads, head_dim).transpose(1, 2)  # [b, kvh, ctx, d]
    values = v[tables.long()].reshape(b, -1, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale, enable_gqa=True)
    return out[:, :, 0]
