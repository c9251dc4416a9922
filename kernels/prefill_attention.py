"""Paged prefill attention: a flattened, ragged batch of query chunks against keys in the paged KV cache.

Sequence i's queries are the last `query_len_i` of its `seq_lens[i]` tokens (the earlier ones are a cached
prefix: chunked prefill, prefix-cache hits); every key, new ones included, is read through the block
table. A query at position p sees keys at positions <= p, and with a sliding window W only those > p - W.

    q, out: [num_tokens, num_q_heads, head_dim]          query_start_loc: [num_seqs + 1]
    caches: [num_blocks, block_size, num_kv_heads, head_dim]   block_tables: [num_seqs, max_blocks]
                                                        seq_lens: [num_seqs]

Flash-attention style: one program per (query tile, KV head, sequence) runs an online softmax (float32)
over tiles of BLOCK_N keys with tl.dot on the input dtype. A program's BLOCK_M rows pack the whole GQA
group of a few query tokens, so each key tile is gathered once for all the query heads that share it:

    rows:  | t0 h0 | t0 h1 | .. | t0 h{g-1} | t1 h0 | ..      tile_tokens = BLOCK_M // group tokens

(q's heads of one KV group are adjacent in memory, so a row block is a contiguous run of q.)
Key tiles run in three ranges: below the sliding window's full reach (masked), fully visible to every row
(no mask), and the causal diagonal (masked); tiles past the last row's position or wholly below the first
row's window are never visited. Slots past a sequence's length are never read into the result: their
scores are -inf and their values loaded as 0, so they may hold anything (NaN included).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_q_and_caches

BLOCK_M = 128
"""Query rows (tokens x GQA group) per program for head_dim <= 128 in 16-bit dtypes."""
BLOCK_N = 64
"""Keys per inner step for head_dim <= 128 in 16-bit dtypes."""
NUM_WARPS = 8
"""Warps per program: two Hopper warpgroups over BLOCK_M = 128 (for head_dim 64, 4 warps need 239
registers a thread against 125)."""
NUM_STAGES = 5
"""Software-pipeline depth. The block-table load takes a stage of its own ahead of the K/V loads it
addresses: 5 keeps K/V two tiles ahead of the dots (3 or 4 only one), in 129 KiB of shared memory at
head_dim 128 (as compiled by Triton 3.9 for sm_90)."""
LARGE_DIM_TILES = (64, 32, 8, 3)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit head_dim > 128 (shared memory, registers)."""
FP32_TILES = (32, 32, 8, 2)
"""The same for fp32: exact (non-tensor-core) dots hold their operands in registers."""
_LOG2_E = math.log2(math.e)


class _Launch(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The same function in plain torch (gather the pages, softmax in float32), one sequence at a time.

    `max_query_len` is accepted for the kernel's signature and not needed here."""
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        rows = slice(starts[i], starts[i + 1])
        out[rows] = _reference_one(q[rows], k_cache, v_cache, block_tables[i], seq_len, scale, sliding_window)
    return out


def _reference_one(
    q: torch.Tensor,  # [n, num_q_heads, head_dim]: the last n of the sequence's seq_len tokens
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [max_blocks]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [n, num_q_heads, head_dim]
    n, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    pages = table[: -(-seq_len // block_size)].long()
    keys = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()  # [seq_len, kvh, d]
    values = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
    qf = q.float().view(n, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [n, kvh, g, d]
    scores = torch.einsum("nhgd,lhd->hgnl", qf, keys) * scale  # [kvh, g, n, seq_len]
    q_pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    allowed = k_pos <= q_pos  # [n, seq_len]
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hgnl,lhd->nhgd", probs, values).reshape(n, num_q_heads, head_dim).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v for each sequence's query chunk over its paged keys.

    `max_query_len` (a host int, >= every query length) sizes the grid, so no device sync is needed;
    rows of q that belong to no sequence are left untouched in `out`. Any GQA ratio, any head_dim
    (padded to a power of two), power-of-two block sizes; bf16, fp16 or fp32 (exact products for fp32).
    `block_m`/`block_n` (powers of two >= 16) override the tuned tile sizes."""
    _check(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    dim_pad = max(triton.next_power_of_2(head_dim), 16)  # tl.dot needs K >= 16
    launch = _launch_config(q.dtype, dim_pad, group, block_m, block_n)
    tile_tokens = launch.block_m // group
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len <= 0 or num_tokens == 0:
        return out
    grid = (triton.cdiv(max_query_len, tile_tokens), num_kv_heads, num_seqs)
    # bf16 dots are wrong under the CPU interpreter (it multiplies the raw uint16 storage): there, and
    # only there, the 16-bit operands are widened to float32 first, which gives the same products.
    widen = q.dtype == torch.bfloat16 and q.device.type != "cuda"
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * _LOG2_E, group, tile_tokens, sliding_window or 0,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        block_tables.stride(0),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n, HAS_WINDOW=sliding_window is not None, WIDEN=widen,
        PRECISION="ieee" if q.dtype == torch.float32 or widen else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return out


def _launch_config(
    dtype: torch.dtype, dim_pad: int, group: int, block_m: int | None, block_n: int | None
) -> _Launch:
    """Tuned tiles for the dtype and head size, overridden by explicit block_m/block_n (power of two,
    >= 16). BLOCK_M grows to hold at least one token's whole GQA group."""
    if dtype == torch.float32:
        tiles = _Launch(*FP32_TILES)
    elif dim_pad > 128:
        tiles = _Launch(*LARGE_DIM_TILES)
    else:
        tiles = _Launch(BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    m = max(block_m or tiles.block_m, triton.next_power_of_2(group))
    return tiles._replace(block_m=m, block_n=block_n or tiles.block_n)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
    sliding_window: int | None,
) -> None:
    """Shapes, dtypes and strides, before any launch (ValueError names the problem)."""
    check_q_and_caches(q, k_cache, v_cache, "tokens")
    _check_batch(block_tables, query_start_loc, seq_lens)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must match q's shape and dtype, got {tuple(out.shape)} {out.dtype}")
    if block_tables.stride(-1) != 1 or (out is not None and out.stride(-1) != 1):
        raise ValueError("the last dimension of block_tables and out must be contiguous")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def _check_batch(block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """The batch description: int32 tables, one row and one length per sequence, num_seqs + 1 offsets."""
    if any(t.dtype != torch.int32 for t in (block_tables, query_start_loc, seq_lens)):
        raise ValueError("block_tables, query_start_loc and seq_lens must be int32")
    if seq_lens.dim() != 1 or block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} do not describe "
            "the same sequences"
        )
    if query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(
            f"query_start_loc must have num_seqs + 1 = {seq_lens.shape[0] + 1} entries, "
            f"got shape {tuple(query_start_loc.shape)}"
        )
    if query_start_loc.stride(0) != 1 or seq_lens.stride(0) != 1:
        raise ValueError("query_start_loc and seq_lens must be contiguous")


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, start_loc_ptr, lens_ptr,
    qk_scale, group, tile_tokens, window,
    q_s0, q_s1, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, o_s0, o_s1, table_s0,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query tile, KV head, sequence): BLOCK_M rows = tile_tokens tokens x the KV head's group."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the latest (costliest) query tiles launch first
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(start_loc_ptr + seq)
    q_len = tl.load(start_loc_ptr + seq + 1) - q_start
    tok0 = tile * tile_tokens
    if tok0 >= q_len:
        return
    context = tl.load(lens_ptr + seq) - q_len  # cached tokens before this chunk
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_PAD)
    tok = tok0 + r // group  # [BLOCK_M] query token (within the chunk) of each row
    heads = kv_head * group + r % group
    row_ok = (r < tile_tokens * group) & (tok < q_len)
    last_tok = tl.minimum(tok0 + tile_tokens, q_len) - 1
    first_pos = context + tok0
    last_pos = context + last_tok
    q_pos = context + tl.minimum(tok, last_tok)  # [BLOCK_M]; padding rows repeat the last query's position
    row_off = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + row_off[:, None] * q_s0 + heads[:, None] * q_s1 + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_M, DIM_PAD]
    if WIDEN:
        q = q.to(tl.float32)
    k_base = k_ptr + kv_head * k_s2
    v_base = v_ptr + kv_head * v_s2
    table = table_ptr + seq * table_s0
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max per row (log2 units)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros((BLOCK_M, DIM_PAD), tl.float32)  # unnormalised output rows
    # key ranges: [lo, full_lo) masked (window edge) | [full_lo, full_hi) unmasked | [full_hi, end) causal
    end = last_pos + 1
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, end)
        acc, row_sum, m = _attend_tiles(
            acc, row_sum, m, q, q_pos, k_base, v_base, table, k_s0, k_s1, v_s0, v_s1, qk_scale, window,
            lo, full_lo, last_pos,
            HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, WIDEN, PRECISION,
        )  # fmt: skip
    full_hi = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, full_lo)
    acc, row_sum, m = _attend_tiles(
        acc, row_sum, m, q, q_pos, k_base, v_base, table, k_s0, k_s1, v_s0, v_s1, qk_scale, window,
        full_lo, full_hi, last_pos,
        HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, False, HAS_WINDOW, WIDEN, PRECISION,
    )  # fmt: skip
    acc, row_sum, m = _attend_tiles(
        acc, row_sum, m, q, q_pos, k_base, v_base, table, k_s0, k_s1, v_s0, v_s1, qk_scale, window,
        full_hi, end, last_pos,
        HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, WIDEN, PRECISION,
    )  # fmt: skip
    result = acc / row_sum[:, None]  # every real row saw at least its own key, so row_sum > 0
    o_ptrs = out_ptr + row_off[:, None] * o_s0 + heads[:, None] * o_s1 + d[None, :]
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _attend_tiles(
    acc, row_sum, m, q, q_pos, k_base, v_base, table, k_s0, k_s1, v_s0, v_s1, qk_scale, window,
    start, stop, last_pos,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key tiles starting at start, start + BLOCK_N, ... < stop.

    MASKED: per-(row, key) causal and window masks, and keys past last_pos (the tile's last query, so
    inside the sequence) neither loaded nor scored. Unmasked ranges must be visible to every row."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, DIM_PAD)
    for tile_start in range(start, stop, BLOCK_N):
        pos = tile_start + n  # [BLOCK_N] key positions
        key_ok = pos <= last_pos
        k = _load_kv_tile(k_base, table, pos, key_ok, d, k_s0, k_s1, HEAD_DIM, DIM_PAD, BLOCK_SIZE, MASKED)
        v = _load_kv_tile(v_base, table, pos, key_ok, d, v_s0, v_s1, HEAD_DIM, DIM_PAD, BLOCK_SIZE, MASKED)
        if WIDEN:
            k = k.to(tl.float32)
        # scores: [BLOCK_M, BLOCK_N] in log2 units (qk_scale holds log2(e))
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            allowed = pos[None, :] <= q_pos[:, None]
            if HAS_WINDOW:
                allowed &= pos[None, :] > q_pos[:, None] - window
            scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_new_safe = m_new
        if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_new_safe[:, None])
        alpha = tl.exp2(m - m_new_safe)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        p = p.to(v.dtype)  # rounded to the value dtype before P @ V, as FlashAttention does
        if WIDEN:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    return acc, row_sum, m


@triton.jit
def _load_kv_tile(
    base, table, pos, key_ok, d, s0, s1,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, DIM_PAD] keys or values of one KV head at positions pos, gathered through the block table.

    Masked-off keys and padding dims load as 0; unmasked tiles load without predicates (vectorized)."""
    if MASKED:
        block = tl.load(table + pos // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        block = tl.load(table + pos // BLOCK_SIZE)
    rows = base + block.to(tl.int64) * s0 + (pos % BLOCK_SIZE) * s1  # [BLOCK_N] row pointers
    ptrs = rows[:, None] + d[None, :]
    if MASKED:
        if HEAD_DIM == DIM_PAD:
            tile = tl.load(ptrs, mask=key_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=key_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == DIM_PAD:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
    return tile
