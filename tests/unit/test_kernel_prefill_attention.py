"""Paged prefill attention (Triton) against its torch reference, on small ragged batches (cached prefixes
of 0, part of a page and several pages; query chunks of 1 token up to several tiles) with shuffled block
tables and NaN in every cache slot no sequence may read. Without CUDA the kernel runs under
TRITON_INTERPRET=1 (slow: shapes and tiles stay small)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from paged_cases import paged_kv_cache  # noqa: E402

from baton.kernels import paged_prefill_attention, paged_prefill_attention_reference  # noqa: E402
from baton.shared.engine.attention import AttentionLayerSpec, AttentionMetadata  # noqa: E402
from baton.shared.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_case(
    seed: int, seqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """seqs: (cached prefix, query chunk) per sequence. Disjoint shuffled pages per sequence; slots past
    each length, unused pages and the table's padding (pointing at an unused page) hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [context + new for context, new in seqs]
    k_cache, v_cache, tables = paged_kv_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    starts = torch.tensor([0] + [new for _, new in seqs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), num_q_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k_cache, v_cache, tables, starts, lens))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


CASES = [
    # (cached prefix, query chunk) per sequence; q heads, kv heads, head_dim, block size, dtype, window
    ([(0, 1), (5, 3), (24, 20), (0, 33)], 4, 2, 64, 8, torch.float32, None),
    ([(3, 17), (40, 5), (0, 1)], 6, 2, 80, 16, torch.float16, None),  # group of 3, head_dim 80 (padded)
    ([(16, 40), (0, 12)], 4, 4, 64, 32, torch.bfloat16, None),  # MHA, two query tiles per sequence
    ([(30, 18), (3, 9), (0, 1)], 4, 2, 32, 8, torch.float32, 7),  # window inside one key tile
    ([(50, 21), (0, 30)], 2, 1, 64, 16, torch.bfloat16, 20),  # window across tiles, MQA
    ([(60, 20), (5, 40)], 4, 2, 64, 64, torch.float16, 40),  # all three key ranges, block size 64
    ([(9, 6), (0, 3)], 2, 2, 16, 8, torch.float32, 1),  # each query sees only itself
]


@pytest.mark.parametrize(
    ("seqs", "num_q_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "window"), CASES
)
def test_matches_the_reference(
    seqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, window: int | None,
) -> None:  # fmt: skip
    q, k_cache, v_cache, tables, starts, lens = make_case(
        len(seqs) * 7 + head_dim, seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    max_query_len = max(new for _, new in seqs)
    batch = (q, k_cache, v_cache, tables, starts, lens, scale, max_query_len)
    want = paged_prefill_attention_reference(*batch, sliding_window=window)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = paged_prefill_attention(*batch, out=out, sliding_window=window, block_m=16, block_n=16)
    assert got is out and not torch.isnan(got).any()
    assert relative_error(got, want) < TOLERANCE[dtype]


def test_default_tiles() -> None:
    """The tuned tile sizes (one program covers a whole query chunk and its GQA group)."""
    q, k_cache, v_cache, tables, starts, lens = make_case(3, [(70, 30), (0, 9)], 8, 2, 64, 16, torch.float16)
    batch = (q, k_cache, v_cache, tables, starts, lens, 0.125, 30)
    got = paged_prefill_attention(*batch)
    assert relative_error(got, paged_prefill_attention_reference(*batch)) < TOLERANCE[torch.float16]


def test_offsets_index_rows_after_other_rows() -> None:
    """A batch's prefill chunks after its decode rows: offsets start past 0, the rows before are untouched."""
    q, k_cache, v_cache, tables, starts, lens = make_case(2, [(9, 6), (0, 11)], 4, 2, 32, 8, torch.float32)
    q = torch.cat((torch.randn(3, *q.shape[1:]).to(q), q))  # 3 rows of no sequence first
    batch = (q, k_cache, v_cache, tables, starts + 3, lens, 0.25, 11)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(*batch, out=out, block_m=16, block_n=16)
    assert torch.isnan(got[:3]).all() and not torch.isnan(got[3:]).any()
    assert relative_error(got[3:], paged_prefill_attention_reference(*batch)[3:]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("window", [None, 6])
def test_reference_agrees_with_the_torch_backend(window: int | None) -> None:
    seqs = [(0, 7), (13, 5), (4, 1)]
    q, k_cache, v_cache, tables, starts, lens = make_case(1, seqs, 4, 2, 16, 4, torch.float32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long),  # unused by attend()
        query_start_loc=starts,
        seq_lens=lens,
        block_tables=tables,
        num_decodes=0,
        max_query_len=7,
        max_seq_len=int(lens.max()),
        query_start_loc_host=tuple(starts.tolist()),
        seq_lens_host=tuple(lens.tolist()),
    )
    layer = AttentionLayerSpec(4, 2, 16, 0.25, window)
    backend = TorchAttentionBackend().attend(layer, q, k_cache, v_cache, meta)
    ours = paged_prefill_attention_reference(q, k_cache, v_cache, tables, starts, lens, 0.25, 7, window)
    torch.testing.assert_close(ours, backend, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused_before_launch() -> None:
    q, k_cache, v_cache, tables, starts, lens = make_case(0, [(2, 3)], 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(q[:, :3], k_cache, v_cache, tables, starts, lens, 1.0, 3)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k_cache, v_cache, tables, starts.long(), lens, 1.0, 3)
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention(q.half(), k_cache, v_cache, tables, starts, lens, 1.0, 3)
    with pytest.raises(ValueError, match="num_seqs"):
        paged_prefill_attention(q, k_cache, v_cache, tables, starts[:1], lens, 1.0, 3)
    with pytest.raises(ValueError, match="power of two"):
        paged_prefill_attention(q, k_cache[:, :6], v_cache[:, :6], tables, starts, lens, 1.0, 3)
    with pytest.raises(ValueError, match="contiguous"):
        paged_prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k_cache, v_cache, tables,
                                starts, lens, 1.0, 3)  # fmt: skip
