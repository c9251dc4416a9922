"""Which blocks each request holds: prefix-cache lookups, slot allocation, publishing, freeing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

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
            self._blocks[request.request_id] = [*(held or ()), *prefix.block_ids, *new_blocks]
            self._num_published.setdefault(request.request_id, len(prefix.block_ids))
        else:  # the hot path: a running request grows in place
            held.extend(new_blocks)
        return new_blocks

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
