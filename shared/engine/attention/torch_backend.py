"""Reference attention in plain torch: gathers the paged cache and computes softmax(QK^T)V in float32.

Correctness first (the Triton kernels are checked against it); decodes are batched, prefills loop.
"""

from __future__ import annotations

import torch

from baton.shared.engine.attention.backend import AttentionBackend, AttentionLayerSpec
from baton.shared.engine.attention.metadata import AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = k_cache.shape[2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def gather_blocks(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_ids: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pair = (k_cache.index_select(0, block_ids), v_cache.index_select(0, block_ids))
        return torch.stack(pair) if out is None else torch.stack(pair, out=out)

    def scatter_blocks(
        self, kv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> None:
        k_cache.index_copy_(0, block_ids, kv[0])
        v_cache.index_copy_(0, block_ids, kv[1])

    def attend(
        self,
        layer: AttentionLayerSpec,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = _decode_attention(layer, q[:nd], k_cache, v_cache, meta, nd)
        starts = meta.query_start_loc_host
        for i in range(nd, meta.num_seqs):
            seq_len = meta.seq_lens_host[i]
            keys, values = _gather(k_cache, v_cache, meta.block_tables[i : i + 1], seq_len)
            q_i = q[starts[i] : starts[i + 1]]  # [n, num_heads, head_dim]
            q_pos = torch.arange(seq_len - q_i.shape[0], seq_len, device=q.device)
            out[starts[i] : starts[i + 1]] = _attention(layer, q_i[None], keys, values, q_pos[None])[0]
        return out


def _decode_attention(
    layer: AttentionLayerSpec,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    nd: int,
) -> torch.Tensor:
    max_len = max(meta.seq_lens_host[:nd])
    keys, values = _gather(k_cache, v_cache, meta.block_tables[:nd], max_len)
    q_pos = (meta.seq_lens[:nd].to(torch.long) - 1)[:, None]  # [nd, 1]; keys past it are masked
    return _attention(layer, q[:, None], keys, values, q_pos)[:, 0]


def _gather(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's first num_keys keys and values, contiguous: [b, num_keys, num_kv_heads, head_dim]."""
    block_size = k_cache.shape[1]
    num_blocks = -(-num_keys // block_size)
    table = block_tables[:, :num_blocks].to(torch.long)
    b = table.shape[0]
    keys = k_cache[table].reshape(b, num_blocks * block_size, *k_cache.shape[2:])[:, :num_keys]
    values = v_cache[table].reshape(b, num_blocks * block_size, *v_cache.shape[2:])[:, :num_keys]
    return keys, values


def _attention(
    layer: AttentionLayerSpec,
    q: torch.Tensor,  # [b, n, num_heads, head_dim]
    keys: torch.Tensor,  # [b, L, num_kv_heads, head_dim]
    values: torch.Tensor,  # [b, L, num_kv_heads, head_dim]
    q_pos: torch.Tensor,  # [b, n] absolute position of each query; it sees keys at positions <= q_pos
) -> torch.Tensor:  # [b, n, num_heads, head_dim]
    b, n, num_heads, head_dim = q.shape
    group = num_heads // layer.num_kv_heads
    qf = q.float().view(b, n, layer.num_kv_heads, group, head_dim)
    scores = torch.einsum("bnhgd,blhd->bhgnl", qf, keys.float()) * layer.scale  # [b, kvh, g, n, L]
    k_pos = torch.arange(keys.shape[1], device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [b, n, L]
    if layer.sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - layer.sliding_window
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgnl,blhd->bnhgd", probs, values.float())
    return out.reshape(b, n, num_heads, head_dim).to(q.dtype)
