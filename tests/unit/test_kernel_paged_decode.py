"""Paged decode attention (Triton) against its torch reference, on small ragged shapes with shuffled
block tables and NaN in every cache slot no sequence may read. Without CUDA the kernel runs under
TRITON_INTERPRET=1 (slow: shapes stay small)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from paged_cases import paged_kv_cache  # noqa: E402

from baton.kernels import paged_decode_attention, paged_decode_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_case(
    seed: int, seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Disjoint shuffled pages per sequence; slots no sequence may read hold NaN (see paged_cases)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = paged_kv_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k_cache, v_cache, tables, lens))


@pytest.mark.parametrize(
    ("seq_lens", "num_q_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "num_splits"),
    [
        ([1, 17, 40], 4, 2, 64, 8, torch.float32, 1),
        ([5, 70, 33, 16], 8, 2, 64, 16, torch.float32, 3),  # splits, some of them empty for short ones
        ([9, 31], 6, 2, 80, 8, torch.float16, 4),  # group of 3 (padded), head_dim not a power of two
        ([64, 3], 4, 4, 32, 32, torch.bfloat16, 2),  # MHA
        ([100], 8, 1, 128, 64, torch.bfloat16, None),  # MQA, the default split count
    ],
)
def test_matches_the_reference(
    seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, num_splits: int | None,
) -> None:  # fmt: skip
    q, k_cache, v_cache, tables, lens = make_case(
        len(seq_lens) * 7 + head_dim, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out, num_splits=num_splits)
    assert got is out and not torch.isnan(got).any()
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert error < TOLERANCE[dtype], error


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window_sees_only_the_last_keys(num_splits: int) -> None:
    q, k_cache, v_cache, tables, lens = make_case(5, [3, 50, 77], 4, 2, 32, 8, torch.float32)
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.2, sliding_window=20)
    got = paged_decode_attention(
        q, k_cache, v_cache, tables, lens, 0.2, num_splits=num_splits, sliding_window=20
    )
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    full = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.2)
    assert (got[0] - full[0]).norm() < 1e-5  # 3 tokens: all inside the window
    assert (got[2] - full[2]).norm() > 1e-2  # a long sequence's result changes


def test_bad_shapes_are_refused_before_launch() -> None:
    q, k_cache, v_cache, tables, lens = make_case(0, [5], 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k_cache, v_cache, tables.long(), lens, 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q.half(), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, 1.0)
