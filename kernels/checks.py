"""Argument checks the attention kernels share, run before any launch (ValueError names the problem)."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_q_and_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_rows: str) -> None:
    """q [q_rows, heads, dim] against equal caches [blocks, block_size, kv_heads, dim]: ranks, head_dim,
    the GQA ratio, a power-of-two block size, one supported dtype, contiguous last dimensions."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [{q_rows}, heads, dim] and equal 4-d caches, got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    _, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q head_dim {head_dim} vs cache {cache_dim}, or {num_q_heads} query heads not a multiple "
            f"of {num_kv_heads} KV heads"
        )
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q and caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the last dimension of q and of the caches must be contiguous")
