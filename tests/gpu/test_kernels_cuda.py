"""Every Triton kernel against its torch reference on the GPU, on realistic shapes: ragged batches,
shuffled block tables, NaN in every cache slot no sequence may read. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from paged_cases import paged_kv_cache

from baton.kernels import (
    apply_rotary,
    apply_rotary_reference,
    gather_kv_blocks,
    gather_kv_blocks_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    rms_norm,
    rms_norm_reference,
    scatter_kv_blocks,
    silu_and_mul,
    silu_and_mul_reference,
    store_kv,
    store_kv_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def paged_case(
    seq_lens: list[int], kv_heads: int, head_dim: int, block: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return paged_kv_cache(seq_lens, kv_heads, head_dim, block, dtype, gen)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "block", "dtype", "window"),
    [
        (32, 8, 128, 16, torch.bfloat16, None),
        (32, 8, 128, 32, torch.float16, None),
        (16, 4, 64, 8, torch.float32, None),
        (28, 4, 128, 64, torch.bfloat16, None),  # group of 7 (Qwen-like)
        (32, 8, 128, 16, torch.bfloat16, 500),
    ],
)
def test_paged_decode(
    q_heads: int, kv_heads: int, head_dim: int, block: int, dtype: torch.dtype, window: int | None
) -> None:
    lens = [1, 17, 900, 3000, 4096, 2049, 64, 1500] * 4
    k, v, tables = paged_case(lens, kv_heads, head_dim, block, dtype, seed=head_dim + block)
    q = torch.randn(len(lens), q_heads, head_dim, device="cuda").to(dtype)
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    scale = head_dim**-0.5
    want = paged_decode_attention_reference(q, k, v, tables, seq_lens, scale, sliding_window=window)
    for splits in (None, 1, 7):
        out = torch.full_like(q, float("nan"))
        got = paged_decode_attention(
            q, k, v, tables, seq_lens, scale, out=out, num_splits=splits, sliding_window=window
        )
        assert not got.isnan().any()
        assert rel_err(got, want) < TOLERANCE[dtype], splits


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "block", "dtype", "window"),
    [
        (32, 8, 128, 16, torch.bfloat16, None),
        (32, 8, 128, 16, torch.float16, None),
        (16, 4, 64, 32, torch.float32, None),
        (28, 4, 128, 16, torch.bfloat16, None),
        (32, 8, 128, 16, torch.bfloat16, 300),
    ],
)
def test_paged_prefill(
    q_heads: int, kv_heads: int, head_dim: int, block: int, dtype: torch.dtype, window: int | None
) -> None:
    # (cached prefix, new tokens): fresh prompts, chunks after a prefix, a single-token chunk
    parts = [(0, 700), (300, 129), (1000, 1), (17, 2000), (0, 1), (4096, 300)]
    lens = [p + n for p, n in parts]
    k, v, tables = paged_case(lens, kv_heads, head_dim, block, dtype, seed=7 + head_dim)
    starts = torch.tensor([0] + [n for _, n in parts], device="cuda").cumsum(0).int()
    q = torch.randn(int(starts[-1]), q_heads, head_dim, device="cuda").to(dtype)
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    scale = head_dim**-0.5
    max_query = max(n for _, n in parts)
    want = paged_prefill_attention_reference(q, k, v, tables, starts, seq_lens, scale, max_query, window)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(
        q, k, v, tables, starts, seq_lens, scale, max_query, out=out, sliding_window=window
    )
    assert not got.isnan().any()
    assert rel_err(got, want) < TOLERANCE[dtype]


def test_store_gather_scatter_are_exact() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    k_cache = torch.randn(512, 16, 8, 128, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(4096, 48, 128, device="cuda", generator=gen).bfloat16()  # a fused qkv: strided k, v
    k, v = qkv[:, 32:40], qkv[:, 40:]
    slots = torch.randperm(512 * 16, device="cuda", generator=gen)[:4096]
    slots[::7] = -1  # padding: skipped
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, want_k, want_v, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    ids = torch.randperm(512, device="cuda", generator=gen)[:300]
    blocks = gather_kv_blocks(k_cache, v_cache, ids)
    assert torch.equal(blocks, gather_kv_blocks_reference(k_cache, v_cache, ids))
    other_k, other_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    scatter_kv_blocks(blocks, other_k, other_v, ids)
    assert torch.equal(other_k[ids], k_cache[ids]) and torch.equal(other_v[ids], v_cache[ids])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_helpers(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(777, 2048, device="cuda", generator=gen).to(dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(2048, device="cuda", generator=gen)).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert rel_err(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5)) < tolerance
    normed, summed = rms_norm(x, weight, 1e-5, residual=residual)
    want_normed, want_summed = rms_norm_reference(x, weight, 1e-5, residual=residual)
    assert torch.equal(summed, want_summed) and rel_err(normed, want_normed) < tolerance
    gate_up = torch.randn(777, 2 * 8192, device="cuda", generator=gen).to(dtype)
    assert rel_err(silu_and_mul(gate_up), silu_and_mul_reference(gate_up)) < tolerance
    angles = torch.rand(8192, 64, device="cuda", generator=gen) * 6.3
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    positions = torch.randint(0, 8192, (777,), device="cuda", generator=gen)
    q = torch.randn(777, 32, 128, device="cuda", generator=gen).to(dtype)
    k = torch.randn(777, 8, 128, device="cuda", generator=gen).to(dtype)
    want_q, want_k = apply_rotary_reference(q.clone(), k.clone(), cos, sin, positions)
    got_q, got_k = apply_rotary(q, k, cos, sin, positions)
    assert rel_err(got_q, want_q) < tolerance and rel_err(got_k, want_k) < tolerance
