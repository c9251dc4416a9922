"""Attention with Baton's Triton kernels (the GPU path): the new K/V go into the paged cache by slot
mapping, the batch's decodes run the split-KV paged decode kernel, its prefill chunks the varlen
prefill kernel over the same cache (cached prefix included).

Results agree with the torch backend within dtype tolerance (tf32 products in the decode kernel,
16-bit products in the prefill kernel for 16-bit models)."""

from __future__ import annotations

import torch

from baton.kernels import (
    gather_kv_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    scatter_kv_blocks,
    store_kv,
)
from baton.shared.engine.attention.backend import AttentionBackend, AttentionLayerSpec
from baton.shared.engine.attention.metadata import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fused_layers = True

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def gather_blocks(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_ids: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return gather_kv_blocks(k_cache, v_cache, block_ids, out)

    def scatter_blocks(
        self, kv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> None:
        scatter_kv_blocks(kv.contiguous(), k_cache, v_cache, block_ids)

    def attend(
        self,
        layer: AttentionLayerSpec,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        out = torch.empty_like(q)
        nd = meta.num_decodes  # decodes come first, one token each: tokens [0, nd) are theirs
        if nd:
            paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], layer.scale,
                out=out[:nd], sliding_window=layer.sliding_window,
            )  # fmt: skip
        if nd < meta.num_seqs:
            # the offsets index q's rows as they are (the decode rows before them are left alone)
            paged_prefill_attention(
                q, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:], meta.seq_lens[nd:],
                layer.scale, meta.max_query_len, out=out, sliding_window=layer.sliding_window,
            )  # fmt: skip
        return out
