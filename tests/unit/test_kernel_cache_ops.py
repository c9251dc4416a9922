"""KV cache kernels (Triton) against the engine's index_copy_ / index_select code, bit for bit: store_kv
with skipped (negative) slots and casts to the cache dtype, and whole-block gather/scatter over ragged,
shuffled block lists. Caches start full of random values, so a slot written by mistake or skipped by
mistake shows. Without CUDA the kernels run under TRITON_INTERPRET=1 (shapes stay small)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from baton.kernels import (  # noqa: E402
    cache_ops,
    gather_kv_blocks,
    gather_kv_blocks_reference,
    scatter_kv_blocks,
    scatter_kv_blocks_reference,
    store_kv,
    store_kv_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    mismatched = (bits(got) != bits(want)).sum().item()
    assert mismatched == 0, f"{mismatched} of {got.numel()} elements differ"


def caches(
    gen: torch.Generator,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches as the two halves of one [num_blocks, 2, ...] buffer: stride(0) is twice a block."""
    both = randn(gen, num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=dtype)
    return both[:, 0], both[:, 1]


# --- store_kv ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "src_dtype", "cache_dtype", "tile"),
    [
        (4, 2, 64, torch.float32, torch.float32, None),
        (8, 3, 80, torch.float16, torch.float16, None),  # head_dim not a power of two
        (16, 1, 32, torch.bfloat16, torch.bfloat16, None),
        (4, 5, 16, torch.float32, torch.bfloat16, 32),  # cast (round to nearest even); 2 heads per program
        (8, 2, 48, torch.float32, torch.float16, None),
    ],
)
def test_store_kv_matches_index_copy(
    block_size: int, num_kv_heads: int, head_dim: int, src_dtype: torch.dtype, cache_dtype: torch.dtype,
    tile: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if tile is not None:
        monkeypatch.setattr(cache_ops, "STORE_TILE", tile)
    gen = torch.Generator().manual_seed(block_size * head_dim + num_kv_heads)
    num_blocks, num_tokens = 6, 13
    k_cache, v_cache = caches(gen, num_blocks, block_size, num_kv_heads, head_dim, cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 5, 12]] = -1  # padding rows: skipped, their slot's old contents stay
    slots = slots.to(DEVICE)
    kv_size = num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, 3 * kv_size, dtype=src_dtype)  # k and v are strided views, as in the model
    k = qkv[:, kv_size : 2 * kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * kv_size :].view(num_tokens, num_kv_heads, head_dim)
    want_k, want_v = k_cache.contiguous(), v_cache.contiguous()
    store_kv_reference(k, v, want_k, want_v, slots)
    store_kv(k, v, k_cache, v_cache, slots if src_dtype != torch.bfloat16 else slots.int())
    assert_bitwise(k_cache, want_k)
    assert_bitwise(v_cache, want_v)


def test_store_kv_with_every_slot_skipped_or_no_tokens_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = caches(gen, 2, 4, 2, 16, torch.float16)
    before = k_cache.clone(), v_cache.clone()
    k, v = randn(gen, 3, 2, 16, dtype=torch.float16), randn(gen, 3, 2, 16, dtype=torch.float16)
    store_kv(k, v, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    store_kv(k[:0], v[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert_bitwise(k_cache, before[0])
    assert_bitwise(v_cache, before[1])


def test_store_kv_refuses_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache = caches(gen, 2, 4, 2, 16, torch.float16)
    k, v = randn(gen, 3, 2, 16, dtype=torch.float16), randn(gen, 3, 2, 16, dtype=torch.float16)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="heads and dim"):
        store_kv(k[:, :1], v[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, v, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, v, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        store_kv(k.double(), v.double(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="share a dtype"):
        store_kv(k, v, k_cache, v_cache.float(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(k.transpose(1, 2).contiguous().transpose(1, 2), v, k_cache, v_cache, slots)


# --- gather / scatter -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "block_ids", "chunk"),
    [
        (4, 2, 16, [5, 0, 3], None),
        (8, 3, 80, [7], None),  # a block of 1920 elements: one masked chunk
        (4, 3, 20, [2, 9, 4, 6, 1], 64),  # 240 elements in chunks of 64 (the last partial)
        (16, 1, 8, [3, 1], None),
    ],
)
def test_gather_matches_index_select(
    dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int, block_ids: list[int],
    chunk: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if chunk is not None:
        monkeypatch.setattr(cache_ops, "COPY_CHUNK", chunk)
    gen = torch.Generator().manual_seed(len(block_ids) * head_dim)
    k_cache, v_cache = caches(gen, 10, block_size, num_kv_heads, head_dim, dtype)
    for index_dtype in (torch.int64, torch.int32):
        ids = torch.tensor(block_ids, dtype=index_dtype, device=DEVICE)
        want = gather_kv_blocks_reference(k_cache, v_cache, ids)
        out = torch.full_like(want, float("nan"))  # poisoned: every element must be written
        got = gather_kv_blocks(k_cache, v_cache, ids, out=out)
        assert got is out
        assert_bitwise(got, want)
    assert_bitwise(gather_kv_blocks(k_cache, v_cache, ids), want)  # allocating its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_ids", "chunk"), [([4, 0, 7], None), ([1, 8, 2, 5, 3, 6], 64)])
def test_scatter_matches_index_copy(
    dtype: torch.dtype, block_ids: list[int], chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:
        monkeypatch.setattr(cache_ops, "COPY_CHUNK", chunk)
    gen = torch.Generator().manual_seed(len(block_ids))
    k_cache, v_cache = caches(gen, 9, 4, 3, 20, dtype)
    ids = torch.tensor(block_ids, device=DEVICE)
    kv = randn(gen, 2, len(block_ids), 4, 3, 20, dtype=dtype)
    want_k, want_v = k_cache.contiguous(), v_cache.contiguous()
    scatter_kv_blocks_reference(kv, want_k, want_v, ids)
    scatter_kv_blocks(kv, k_cache, v_cache, ids.int())
    assert_bitwise(k_cache, want_k)  # the blocks not listed keep their contents
    assert_bitwise(v_cache, want_v)


def test_scatter_of_a_gather_rebuilds_the_blocks_elsewhere() -> None:
    """Ship blocks [3, 0] of one cache into blocks [1, 4] of another, as remote prefill does."""
    gen = torch.Generator().manual_seed(4)
    src_k, src_v = caches(gen, 5, 8, 2, 32, torch.bfloat16)
    dst_k, dst_v = caches(gen, 5, 8, 2, 32, torch.bfloat16)
    kv = gather_kv_blocks(src_k, src_v, torch.tensor([3, 0], device=DEVICE))
    scatter_kv_blocks(kv, dst_k, dst_v, torch.tensor([1, 4], device=DEVICE))
    assert_bitwise(dst_k[[1, 4]], src_k[[3, 0]])
    assert_bitwise(dst_v[[1, 4]], src_v[[3, 0]])


def test_no_blocks_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = caches(gen, 3, 4, 2, 16, torch.float16)
    ids = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert gather_kv_blocks(k_cache, v_cache, ids).shape == (2, 0, 4, 2, 16)
    scatter_kv_blocks(torch.empty(2, 0, 4, 2, 16, dtype=torch.float16, device=DEVICE), k_cache, v_cache, ids)


def test_block_copies_refuse_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache = caches(gen, 4, 4, 2, 16, torch.float16)
    ids = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="block_ids"):
        gather_kv_blocks(k_cache, v_cache, ids.float())
    with pytest.raises(ValueError, match="equal 4-d caches"):
        gather_kv_blocks(k_cache, v_cache.float(), ids)
    with pytest.raises(ValueError, match="block must be contiguous"):
        gather_kv_blocks(k_cache.transpose(2, 3).contiguous().transpose(2, 3), v_cache, ids)
    with pytest.raises(ValueError, match="out must be"):
        gather_kv_blocks(k_cache, v_cache, ids, out=torch.empty(2, 3, 4, 2, 16, device=DEVICE))
    kv = randn(gen, 2, 2, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="kv must be"):
        scatter_kv_blocks(kv.float(), k_cache, v_cache, ids)
    with pytest.raises(ValueError, match="kv must be"):
        scatter_kv_blocks(kv[:, :1], k_cache, v_cache, ids)
    with pytest.raises(ValueError, match="each block of kv"):
        scatter_kv_blocks(kv.transpose(3, 4).contiguous().transpose(3, 4), k_cache, v_cache, ids)
