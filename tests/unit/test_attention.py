"""The paged torch backend against plain dense causal attention on random inputs."""

from __future__ import annotations

import pytest
import torch

from baton.shared.engine.attention import AttentionLayerSpec, AttentionMetadata, get_attention_backend

BLOCK = 4


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """q: [n, H, D] for the last n positions of a sequence whose k, v: [L, Hkv, D]."""
    n, heads, dim = q.shape
    length = k.shape[0]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * dim**-0.5
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_paged_attention_matches_dense(window: int | None, heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    dim = 16
    # (context already cached, new tokens): three decodes first, then prefill chunks
    seqs = [(6, 1), (0, 1), (13, 1), (0, 9), (7, 5), (4, 1)]
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous blocks
    full_k, full_v, tables, q_parts, k_new, v_new, slots = [], [], [], [], [], [], []
    for context, new in seqs:
        length = context + new
        blocks = [free.pop() for _ in range(-(-length // BLOCK))]
        tables.append(blocks)
        k_seq = torch.randn(length, kv_heads, dim, generator=gen)
        v_seq = torch.randn(length, kv_heads, dim, generator=gen)
        for pos in range(context):  # the context is already in the cache
            k_cache[blocks[pos // BLOCK], pos % BLOCK] = k_seq[pos]
            v_cache[blocks[pos // BLOCK], pos % BLOCK] = v_seq[pos]
        full_k.append(k_seq)
        full_v.append(v_seq)
        q_parts.append(torch.randn(new, heads, dim, generator=gen))
        k_new.append(k_seq[context:])
        v_new.append(v_seq[context:])
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(context, length)]
    width = max(len(t) for t in tables)
    cu = [0]
    for _, new in seqs:
        cu.append(cu[-1] + new)
    seq_lens = [c + n for c, n in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        num_decodes=3,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_host=tuple(cu),
        seq_lens_host=tuple(seq_lens),
    )
    spec = AttentionLayerSpec(heads, kv_heads, dim, dim**-0.5, window)
    out = get_attention_backend("torch").forward(
        spec, torch.cat(q_parts), torch.cat(k_new), torch.cat(v_new), k_cache, v_cache, meta
    )
    for i in range(len(seqs)):
        expected = dense_attention(q_parts[i], full_k[i], full_v[i], window)
        torch.testing.assert_close(out[cu[i] : cu[i + 1]], expected, rtol=1e-5, atol=1e-5)
    # the new keys and values landed in their slots
    flat_k = k_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[torch.tensor(slots)], torch.cat(k_new))


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; available: torch, triton"):
        get_attention_backend("flash")
