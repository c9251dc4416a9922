"""Runs one scheduled step on the model: flattens the batch, builds attention metadata, samples."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from baton.shared.engine.attention import AttentionMetadata
from baton.shared.engine.cuda_graphs import DecodeGraphs
from baton.shared.engine.host_to_device import arrays_to_device
from baton.shared.engine.kv_cache import KVCaches
from baton.shared.engine.kv_cache_manager import KVCacheManager
from baton.shared.engine.sampler import QueuedTokens, Sampler, SamplingRow
from baton.shared.engine.scheduler import SampledToken, ScheduledChunk, SchedulerOutput
from baton.shared.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] int64: last token of each chunk that samples
    sampling_chunks: list[ScheduledChunk]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        kv_manager: KVCacheManager,
        sampler: Sampler,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.kv = kv_manager
        self.sampler = sampler
        self.device = device
        self.block_size = kv_manager.block_size
        self.graphs: DecodeGraphs | None = None
        """Set by the engine on CUDA: decode-only steps replay a captured graph."""

    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, input_ids: torch.Tensor | None = None
    ) -> QueuedTokens[dict[str, SampledToken]]:
        """Queue the step on the device; its sampled tokens come back as they do from the sampler, by
        request id. `input_ids` [num_chunks] (on the device), for a decode-only step whose last tokens
        are not known on the host yet: each chunk's input token, in order."""
        inputs = self.prepare_inputs(sched.chunks, input_ids)
        meta = inputs.meta
        graphs = self.graphs
        if graphs is not None and meta.num_decodes == meta.num_seqs and meta.num_seqs <= graphs.max_batch:
            hidden = graphs.run(inputs.input_ids, inputs.positions, meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
        if not inputs.sampling_chunks:
            return QueuedTokens(None, dict)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_sampling, vocab]
        rows = [_sampling_row(chunk) for chunk in inputs.sampling_chunks]
        sampling = self.sampler.launch(logits, rows)
        request_ids = [chunk.request.request_id for chunk in inputs.sampling_chunks]

        @torch.inference_mode()
        def result() -> dict[str, SampledToken]:
            out = sampling()
            return {
                rid: SampledToken(
                    token_id=out.token_ids[i],
                    logprob=out.logprobs[i] if out.logprobs is not None else None,
                    rank=out.ranks[i] if out.ranks is not None else None,
                    top_logprobs=out.top_logprobs[i] if out.top_logprobs is not None else None,
                )
                for i, rid in enumerate(request_ids)
            }

        return QueuedTokens(sampling.token_ids, result)

    def prepare_inputs(
        self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None
    ) -> ModelInputs:
        """Chunks arrive decodes first (the scheduler's order), which the metadata relies on. Built
        with one pass of Python per request and NumPy for the rest: this runs every step.
        `input_ids` (device, one per chunk) replaces the requests' tokens in a decode-only step."""
        bs, n = self.block_size, len(chunks)
        query_lens = np.fromiter((c.num_new_tokens for c in chunks), np.int64, n)
        starts = np.fromiter((c.start for c in chunks), np.int64, n)
        seq_lens = starts + query_lens
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        # positions: for each token, its chunk's start plus its offset inside the chunk
        seq_of_token = np.repeat(np.arange(n), query_lens)
        positions = starts[seq_of_token] + np.arange(num_tokens) - cu[seq_of_token]
        max_blocks = int(-(-seq_lens.max() // bs))
        # every scheduled request holds the blocks its tokens need, so max_blocks columns hold its table
        rows = np.fromiter((self.kv.row_of(c.request.request_id) for c in chunks), np.int64, n)
        block_tables = self.kv.block_table[rows, :max_blocks]
        if input_ids is not None:
            if num_tokens != n:
                raise ValueError("device input ids are for decode-only steps")
            host_ids = np.zeros(0, dtype=np.int64)  # nothing to copy
        elif num_tokens == n:  # decodes only: each request's last token
            host_ids = np.array([c.request.all_token_ids[c.start] for c in chunks], dtype=np.int64)
        else:
            host_ids = np.fromiter(
                itertools.chain.from_iterable(
                    c.request.all_token_ids[c.start : c.start + c.num_new_tokens] for c in chunks
                ),
                np.int64,
                num_tokens,
            )
        slot_mapping = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        num_decodes = int(np.argmax(query_lens != 1)) if (query_lens != 1).any() else n
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        logits_indices = cu[1:][sampling] - 1
        # two host-to-device copies in all, one per dtype
        slot_mapping_d, host_ids_d, positions_d, logits_indices_d = arrays_to_device(
            [slot_mapping, host_ids, positions, logits_indices], np.int64, self.device
        )
        cu_d, seq_lens_d, block_tables_d = arrays_to_device(
            [cu, seq_lens, block_tables], np.int32, self.device
        )
        meta = AttentionMetadata(
            slot_mapping=slot_mapping_d,
            query_start_loc=cu_d,
            seq_lens=seq_lens_d,
            block_tables=block_tables_d,
            num_decodes=num_decodes,
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_host=tuple(cu.tolist()),
            seq_lens_host=tuple(seq_lens.tolist()),
        )
        return ModelInputs(
            input_ids=host_ids_d if input_ids is None else input_ids,
            positions=positions_d,
            meta=meta,
            logits_indices=logits_indices_d,
            sampling_chunks=[chunks[i] for i in sampling],
        )


def _sampling_row(chunk: ScheduledChunk) -> SamplingRow:
    """The row holds the request's token lists themselves (they grow in place), so once min_tokens is
    reached nothing in it changes and it is built once."""
    request = chunk.request
    params = request.sampling_params
    if request.num_output_tokens < params.min_tokens:
        eos = frozenset() if params.ignore_eos else request.eos_token_ids
        banned = eos | frozenset(params.stop_token_ids)
        return SamplingRow(params, request.prompt_token_ids, request.output_token_ids, banned)
    if request.sampling_row is None:
        request.sampling_row = SamplingRow(params, request.prompt_token_ids, request.output_token_ids)
    return request.sampling_row
