"""Paged decode attention: one query token per sequence against its keys in the paged KV cache.

Split-KV (flash-decoding): a sequence's tiles of keys are dealt round-robin to `num_splits` splits;
one program per (sequence, KV head, split) computes a partial softmax-weighted sum for every query
head of the KV head's group, and a second kernel combines the splits with their log-sum-exp. The grid
depends only on shapes (never on sequence lengths), so the launch can be captured in a CUDA graph.

    caches: [num_blocks, block_size, num_kv_heads, head_dim]     block_tables: [num_seqs, max_blocks]
    q, out: [num_seqs, num_q_heads, head_dim]                    seq_lens: [num_seqs]

Slots past a sequence's length are never read into the result: their scores are masked and their
values zeroed before use, so they may hold anything (NaN included).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_q_and_caches

TILE_TOKENS = 64
"""Keys one program attends per step (whole pages; a larger block size sets its own)."""
NUM_WARPS = 4
NUM_STAGES = 2
"""Software pipelining of the K/V loads: the next tile's loads are issued before this one's dots."""
NATIVE_DOT = True
"""16-bit caches: tl.dot on the 16-bit operands (P rounded to them too, as FlashAttention does) instead
of tf32 on float32 copies; half the registers per K/V tile."""
WAVES = 2
"""Default split count: enough programs for this many waves over the multiprocessors..."""
MIN_TILES_PER_SPLIT = 2
"""...but no split shorter than this many tiles (short contexts: fewer, longer splits)."""


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The same function in plain torch (gather the pages, softmax in float32), one sequence at a time."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(num_seqs):
        n = int(seq_lens[i])
        pages = block_tables[i, : -(-n // k_cache.shape[1])].long()
        keys = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].float()  # [n, kvh, d]
        values = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].float()
        if sliding_window is not None:
            keys, values = keys[-sliding_window:], values[-sliding_window:]
        qi = q[i].float().view(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,nhd->hgn", qi, keys) * scale
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hgn,nhd->hgd", probs, values).reshape(num_q_heads, head_dim).to(q.dtype)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each sequence's first seq_lens[i] cached tokens (every length >= 1);
    with `sliding_window` W, over its last W tokens only.

    Any GQA ratio; power-of-two block sizes; any head_dim; bf16, fp16 or fp32. `num_splits` None picks
    enough splits to fill the device from the shapes alone (CUDA-graph safe)."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    tile = max(block_size, TILE_TOKENS)
    num_tiles = -(-max_blocks * block_size // tile)
    if num_splits is None:
        num_splits = _default_splits(q.device, num_seqs * num_kv_heads, num_tiles)
    num_splits = max(1, min(num_splits, num_tiles))
    group = num_q_heads // num_kv_heads
    group_pad = max(triton.next_power_of_2(group), 16)  # tl.dot needs 16 rows
    dim_pad = max(triton.next_power_of_2(head_dim), 16)
    if out is None:
        out = torch.empty_like(q)
    common = dict(
        NUM_SPLITS=num_splits, BLOCK_SIZE=block_size, TILE=tile, GROUP_PAD=group_pad, DIM_PAD=dim_pad,
        WINDOW=sliding_window or 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NATIVE=NATIVE_DOT and q.dtype != torch.float32 and q.device.type == "cuda", num_warps=NUM_WARPS,
    )  # fmt: skip
    if num_splits == 1:  # one pass writes the result: no partials, no combine launch
        _split_kernel[(num_seqs, num_kv_heads, 1)](
            q, k_cache, v_cache, block_tables, seq_lens, out, out, out, out, scale, group,
            head_dim, *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
            *out.stride(), STAGES=NUM_STAGES, **common,
        )  # fmt: skip
        return out
    # partials: [num_seqs, num_kv_heads, num_splits, group_pad, dim_pad] in float32; max and sum without dim
    part_out = torch.empty(
        (num_seqs, num_kv_heads, num_splits, group_pad, dim_pad), device=q.device, dtype=torch.float32
    )
    part_max = torch.empty(part_out.shape[:-1], device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_max, part_sum, out,
        scale, group, head_dim,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        STAGES=NUM_STAGES, **common,
    )  # fmt: skip
    _combine_kernel[(num_seqs, num_kv_heads)](
        part_out, part_max, part_sum, out, group, head_dim, *out.stride(),
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), GROUP_PAD=group_pad,
        DIM_PAD=dim_pad,
    )  # fmt: skip
    return out


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Shapes, dtypes and strides, before any launch (ValueError names the problem)."""
    check_q_and_caches(q, k_cache, v_cache, "seqs")
    num_seqs = q.shape[0]
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} do not match "
            f"{num_seqs} sequences"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("the last dimension of block_tables must be contiguous")


def _default_splits(device: torch.device, num_programs: int, num_tiles: int) -> int:
    """Enough programs for WAVES waves over the device's multiprocessors, each split at least
    MIN_TILES_PER_SPLIT tiles long, rounded down to a power of two: the split count is a compile-time
    constant (a runtime one cost B=32 x 1k a third of its speed on an H100), so few variants exist."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = max(1, min(num_tiles // MIN_TILES_PER_SPLIT, -(-WAVES * sms // max(num_programs, 1))))
    return 1 << (wanted.bit_length() - 1)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    """Asked once per device: this runs on every decode step."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    scale, group, head_dim,
    q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, k_s3, v_s0, v_s1, v_s2, v_s3, table_s0, o_s0, o_s1, o_s2,
    NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, GROUP_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): online softmax over tiles of TILE tokens (whole pages). With
    NUM_SPLITS 1 it writes the normalized result to out; otherwise its partials for the combine."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    tok = tl.arange(0, TILE)
    d_ok = d < head_dim
    heads = kv_head * group + g
    # q: [GROUP_PAD, DIM_PAD], the query heads sharing this KV head (padding rows are 0)
    q_ptrs = q_ptr + seq * q_s0 + heads[:, None] * q_s1 + d[None, :] * q_s2
    q = tl.load(q_ptrs, mask=(g < group)[:, None] & d_ok[None, :], other=0.0)
    if not NATIVE:
        q = q.to(tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    s = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
    # this split's tiles are split, split + NUM_SPLITS, ...: interleaved, so every sequence spreads over
    # all splits whatever the block table's width (a CUDA graph's tables are as wide as the longest
    # possible sequence); tiles wholly before a sliding window are skipped
    num_seq_tiles = (seq_len + TILE - 1) // TILE
    end = (tl.maximum(num_seq_tiles - split, 0) + NUM_SPLITS - 1) // NUM_SPLITS
    first_visible = 0
    begin = 0
    if WINDOW > 0:
        first_visible = tl.maximum(seq_len - WINDOW, 0)
        begin = (tl.maximum(first_visible // TILE - split, 0) + NUM_SPLITS - 1) // NUM_SPLITS
    for i in tl.range(begin, end, num_stages=STAGES):
        pos = (split + i * NUM_SPLITS) * TILE + tok
        ok = (pos < seq_len) & (pos >= first_visible)
        block = tl.load(table_ptr + seq * table_s0 + pos // BLOCK_SIZE, mask=ok, other=0)
        slot = pos % BLOCK_SIZE
        kv_mask = ok[:, None] & d_ok[None, :]
        # k, v: [TILE, DIM_PAD] of this KV head, gathered through the block table
        k_ptrs = k_ptr + block[:, None] * k_s0 + slot[:, None] * k_s1 + kv_head * k_s2 + d[None, :] * k_s3
        v_ptrs = v_ptr + block[:, None] * v_s0 + slot[:, None] * v_s1 + kv_head * v_s2 + d[None, :] * v_s3
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        # NATIVE: 16-bit operands, float32 accumulation. Otherwise float32 operands: tf32 tensor cores for
        # 16-bit caches (exact: tf32 holds a bf16 mantissa), exact products for fp32 ones. The CPU
        # interpreter gets 16-bit dots wrong, so it always takes the float32 path.
        if NATIVE:
            scores = tl.dot(q, tl.trans(k))
        else:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))  # [GROUP_PAD, TILE]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        if NATIVE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m = m_new
    if NUM_SPLITS == 1:
        mask = (g < group)[:, None] & d_ok[None, :]
        out_ptrs = out_ptr + seq * o_s0 + heads[:, None] * o_s1 + d[None, :] * o_s2
        tl.store(out_ptrs, (acc / s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        base = ((seq * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * GROUP_PAD
        tl.store(part_out_ptr + (base + g)[:, None] * DIM_PAD + d[None, :], acc)
        tl.store(part_max_ptr + base + g, m)
        tl.store(part_sum_ptr + base + g, s)


@triton.jit
def _combine_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, group, head_dim, o_s0, o_s1, o_s2,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    sp_ok = sp < NUM_SPLITS
    base = (seq * tl.num_programs(1) + kv_head) * NUM_SPLITS
    rows = (base + sp)[:, None] * GROUP_PAD + g[None, :]  # [SPLITS_PAD, GROUP_PAD]
    m = tl.load(part_max_ptr + rows, mask=sp_ok[:, None], other=float("-inf"))
    s = tl.load(part_sum_ptr + rows, mask=sp_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)  # [GROUP_PAD]
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all[None, :]))  # empty splits weigh 0
    total = tl.sum(s * weight, axis=0)
    acc_ptrs = part_out_ptr + rows[:, :, None] * DIM_PAD + d[None, None, :]
    acc = tl.load(acc_ptrs, mask=sp_ok[:, None, None], other=0.0)  # [SPLITS_PAD, GROUP_PAD, DIM_PAD]
    out = tl.sum(acc * weight[:, :, None], axis=0) / total[:, None]  # [GROUP_PAD, DIM_PAD]
    heads = kv_head * group + g
    mask = (g < group)[:, None] & (d < head_dim)[None, :]
    out_ptrs = out_ptr + seq * o_s0 + heads[:, None] * o_s1 + d[None, :] * o_s2
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
