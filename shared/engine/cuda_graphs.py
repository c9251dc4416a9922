"""CUDA graphs of the model's forward for decode-only steps: one graph per batch size in
CAPTURE_SIZES, sharing a memory pool, replayed over static input buffers. A step with B decodes runs
the smallest captured size >= B; the padding rows write nothing (slot -1) and read one token.

Why: a decode step launches ~15 kernels per layer from Python; on a 1B model that host work takes
several times longer than the GPU work. A replay is one launch."""

from __future__ import annotations

import torch

from baton.shared.engine.attention import AttentionMetadata
from baton.shared.engine.kv_cache import KVCaches
from baton.shared.models.llama import LlamaForCausalLM

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch} | {max_batch})
        n = self.sizes[-1]
        # static inputs; rows past a step's batch are padding: slot -1 (no KV write), length 1
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [size, hidden]
        self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode-only step's hidden states [num_seqs, hidden] (num_seqs <= max_batch)."""
        num = meta.num_seqs
        size = next(s for s in self.sizes if s >= num)
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(positions)
        self.slot_mapping[:num].copy_(meta.slot_mapping)
        self.slot_mapping[num:size].fill_(-1)
        self.seq_lens[:num].copy_(meta.seq_lens)
        self.seq_lens[num:size].fill_(1)
        self.block_tables[:num, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:num]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.kv_caches[0][0].shape[1],
            query_start_loc_host=tuple(range(size + 1)),
            seq_lens_host=(1,) * size,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (compiles kernels) outside the capture
                self.model(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize()
