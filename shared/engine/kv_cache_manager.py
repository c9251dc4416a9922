"""Which blocks each request holds: prefix-cache lookups, slot allocation, publishing, freeing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from baton.shared.engine.block_pool import BlockPool, IntegrityError
from baton.shared.engine.request import Request


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks that hold the start of a request's tokens."""

    block_ids: list[int]
    num_tokens: int


NO_MATCH = PrefixMatch([], 0)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps requests to the physical blocks of one worker's paged KV cache."""

    def __init__(self, block_pool: BlockPool, block_size: int) -> None:
        self.pool = block_pool
        self.block_size = block_size
        self._blocks: dict[str, list[int]] = {}
        self._num_published: dict[str, int] = {}
        self.block_table = np.zeros((0, 0), dtype=np.int32)
        """[rows, widest table]: each request's block ids in its own row, kept as blocks are added, so
        a step gathers its batch's tables with one indexing operation instead of per request."""
        self._rows: dict[str, int] = {}  # request id -> its row in block_table
        self._free_rows: list[int] = []
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> PrefixMatch:
        """Longest run of cached full blocks at the start of the request's tokens. At least one token
        is always left to compute, because the last position's logits are needed to sample."""
        if not self.pool.enable_prefix_caching:
            return NO_MATCH
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(block_ids) * self.block_size
        return PrefixMatch(block_ids, len(block_ids) * self.block_size)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, prefix: PrefixMatch = NO_MATCH
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of KV after the computed ones (and after
        `prefix`, for a request not yet holding blocks). Returns the newly allocated block ids, or
        None when they don't fit, in which case nothing changed."""
        held = self._blocks.get(request.request_id)
        if (
            held
            and not prefix.block_ids
            and request.num_computed_tokens + num_new_tokens <= len(held) * self.block_size
        ):
            return []  # most decode steps: the last block still has room
        if prefix.block_ids and held:
            raise IntegrityError(f"request {request.request_id} already holds blocks; no prefix to add")
        num_computed = max(request.num_computed_tokens, prefix.num_tokens)
        num_held = len(held) if held is not None else 0
        num_blocks = cdiv(num_computed + num_new_tokens, self.block_size)
        num_needed = max(num_blocks - num_held - len(prefix.block_ids), 0)
        num_revived = sum(1 for b in prefix.block_ids if self.pool.is_evictable(b))
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(prefix.block_ids)  # before allocating, so they cannot be evicted for ourselves
        new_blocks = self.pool.allocate(num_needed) or []
        if held is None or prefix.block_ids:  # (a request holding blocks brings no prefix: checked above)
            blocks = self._blocks[request.request_id] = [*(held or ()), *prefix.block_ids, *new_blocks]
            self._num_published.setdefault(request.request_id, len(prefix.block_ids))
            self._write_row(request.request_id, 0, blocks)
        else:  # the hot path: a running request grows in place
            self._write_row(request.request_id, len(held), new_blocks)
            held.extend(new_blocks)
        return new_blocks

    def row_of(self, request_id: str) -> int:
        """The request's row in `block_table` (KeyError if it holds no blocks)."""
        return self._rows[request_id]

    def _write_row(self, request_id: str, start: int, block_ids: list[int]) -> None:
        row = self._rows.get(request_id)
        if row is None:
            if not self._free_rows:
                self._grow_table(rows=max(8, 2 * self.block_table.shape[0]), cols=self.block_table.shape[1])
            row = self._rows[request_id] = self._free_rows.pop()
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:
            self._grow_table(rows=self.block_table.shape[0], cols=max(end, 2 * self.block_table.shape[1]))
        self.block_table[row, start:end] = block_ids

    def _grow_table(self, rows: int, cols: int) -> None:
        old = self.block_table
        self.block_table = np.zeros((rows, cols), dtype=np.int32)
        self.block_table[: old.shape[0], : old.shape[1]] = old
        self._free_rows.extend(reversed(range(old.shape[0], rows)))

    def publish_computed_blocks(self, request: Request) -> None:
        """Enter the request's full, computed blocks into the prefix cache (call after the step that
        wrote their KV ran, never before: an unwritten block must not be found by another request)."""
        blocks = self._blocks.get(request.request_id)
        if not blocks or not self.pool.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_published.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = request.block_hashes
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_published[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block the request holds (tail first, see BlockPool.free)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_published.pop(request.request_id, None)
        row = self._rows.pop(request.request_id, None)
        if row is not None:
            self.block_table[row, : len(blocks)] = 0
            self._free_rows.append(row)
        self.pool.free(reversed(blocks))

    @property
    def num_requests(self) -> int:
        return len(self._blocks)

    @property
    def num_request_blocks(self) -> int:
        """Distinct blocks held by requests (a shared prefix block counts once)."""
        return len({b for blocks in self._blocks.values() for b in blocks})

    def check_integrity(self) -> None:
        """I1 with holders: the pool's own invariants, and each block's refcount equals the number of
        requests holding it."""
        self.pool.check_integrity()
        holders = Counter(b for blocks in self._blocks.values() for b in blocks)
        for block_id in range(self.pool.num_blocks):
            if self.pool.refcount(block_id) != holders.get(block_id, 0):
                raise IntegrityError(
                    f"block {block_id}: refcount {self.pool.refcount(block_id)} but "
                    f"{holders.get(block_id, 0)} requests hold it"
                )
        for request_id, blocks in self._blocks.items():
            if len(set(blocks)) != len(blocks):
                raise IntegrityError(f"request {request_id} holds a block twice: {blocks}")
        self._check_block_table()

    def _check_block_table(self) -> None:
        """Each holder's row lists its blocks then zeros; rows are its own; free rows are all zeros."""
        if set(self._rows) != set(self._blocks):
            raise IntegrityError(f"block table rows for {sorted(self._rows)}, holders {sorted(self._blocks)}")
        rows = list(self._rows.values())
        if (
            len(set(rows) | set(self._free_rows)) != len(rows) + len(self._free_rows)
            or len(rows) + len(self._free_rows) != self.block_table.shape[0]
        ):
            raise IntegrityError(f"block table rows are shared or lost: held {rows}, free {self._free_rows}")
        for request_id, row in self._rows.items():
            blocks = self._blocks[request_id]
            expected = np.zeros(self.block_table.shape[1], dtype=np.int32)
            expected[: len(blocks)] = blocks
            if not np.array_equal(self.block_table[row], expected):
                raise IntegrityError(f"request {request_id}: block table row {row} does not list {blocks}")
        if self._free_rows and self.block_table[self._free_rows].any():
            raise IntegrityError("a free block table row is not cleared")
