"""Paged KV caches for the attention kernel tests (every tier): each sequence's pages shuffled across
the cache, and NaN in every slot no sequence may read (past each length, unused pages, and the tables'
padding column, which points at an unused page)."""

from __future__ import annotations

import torch


def paged_kv_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim], block_tables [seqs, max_blocks] int32),
    on the generator's device."""
    device = gen.device
    pages = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=gen, device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    tables = torch.full((len(seq_lens), max(pages) + 1), int(order[-1]), dtype=torch.int32, device=device)
    used = 0
    for i, (n, p) in enumerate(zip(seq_lens, pages, strict=True)):
        ids = order[used : used + p]
        used += p
        tables[i, :p] = ids
        for cache in (k_cache, v_cache):
            values = torch.randn(p * block_size, num_kv_heads, head_dim, generator=gen, device=device).to(
                dtype
            )
            values[n:] = float("nan")
            cache[ids] = values.view(p, block_size, num_kv_heads, head_dim)
    return k_cache, v_cache, tables
