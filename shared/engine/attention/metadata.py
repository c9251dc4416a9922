"""The batch description every attention backend reads: a flattened, variable-length batch.

Sequences come decodes first (exactly one query token each), then prefill chunks, so a backend can
run a decode kernel on the first `num_decodes` sequences and a varlen prefill kernel on the rest:

    tokens:   | d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 |      num_tokens = query_start_loc[-1]
    seqs:       0    1    2    3             4          num_decodes = 3
    query_start_loc = [0, 1, 2, 3, 7, 9]

Sequence i's queries are the last `query_len_i` of its `seq_lens[i]` tokens; their keys and values
(new ones included, written first through `slot_mapping`) live in the paged cache at
`block_tables[i, pos // block_size] * block_size + pos % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat cache slot (block_id * block_size + offset) for each new token's K/V."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: offsets of each sequence's query tokens in the flattened batch."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: tokens of each sequence in the KV cache once this step's are written."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks_per_seq] int32: physical block ids, padded with 0 past each sequence."""
    num_decodes: int
    """The first `num_decodes` sequences have exactly one query token."""
    max_query_len: int
    max_seq_len: int
    query_start_loc_host: tuple[int, ...]
    """Host copy of query_start_loc, so reference code can loop without device syncs."""
    seq_lens_host: tuple[int, ...]
    """Host copy of seq_lens."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes
