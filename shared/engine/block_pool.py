"""Physical KV blocks: refcounts, the free list and the prefix cache with LRU eviction.

Every block is in exactly one state (invariant I1):

    free     refcount 0, no hash          in `_free`       (handed out first, FIFO)
    cached   refcount 0, content hash     in `_evictable`  (LRU order; reused on a prefix hit,
                                                            evicted when no free block is left)
    held     refcount >= 1                in neither       (hash optional: a shared cached prefix)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from baton.shared.engine.block_hash import BlockHash


class IntegrityError(AssertionError):
    """An allocator invariant was broken; the message says which block and how."""


@dataclass(frozen=True)
class BlockUsage:
    """How many blocks are in each state."""

    num_free: int
    num_cached: int
    num_held: int


class BlockPool:
    """Allocator of `num_blocks` physical blocks with refcounts and a content-hash prefix cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._refcounts = [0] * num_blocks
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.num_evictions = 0
        self._cache_events: tuple[list[BlockHash], list[BlockHash]] | None = None

    def track_cache_events(self) -> None:
        """Start recording which hashes enter and leave the prefix cache (for the registry's index)."""
        self._cache_events = ([], [])

    def drain_cache_events(self) -> tuple[list[BlockHash], list[BlockHash]]:
        """(hashes cached, hashes evicted) since the last drain; empty unless tracking."""
        if self._cache_events is None:
            return [], []
        events, self._cache_events = self._cache_events, ([], [])
        return events

    @property
    def cached_hashes(self) -> list[BlockHash]:
        """Every hash the prefix cache holds now (held or evictable)."""
        return list(self._block_of_hash)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones plus unreferenced cached ones (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The cached block holding this content, if any."""
        return self._block_of_hash.get(block_hash)

    def usage(self) -> BlockUsage:
        return BlockUsage(len(self._free), len(self._evictable), self.num_blocks - self.num_free_blocks)

    # -- transitions -----------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` blocks with refcount 1, or None (nothing taken) if they don't fit."""
        if num_blocks > self.num_free_blocks:
            return None
        block_ids = []
        for _ in range(num_blocks):
            block_id = self._free.popleft() if self._free else self._evict_oldest()
            self._refcounts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to cached blocks (a prefix-cache hit); unreferenced ones leave the LRU list."""
        for block_id in block_ids:
            if self._refcounts[block_id] == 0:
                if block_id not in self._evictable:
                    raise IntegrityError(f"block {block_id} touched while free and uncached")
                del self._evictable[block_id]
            self._refcounts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one holder from each block. Pass a request's blocks in reverse order: its tail blocks
        then become the least recently used and are evicted before the prefix that leads to them."""
        for block_id in block_ids:
            if self._refcounts[block_id] <= 0:
                raise IntegrityError(f"block {block_id} freed with refcount {self._refcounts[block_id]}")
            self._refcounts[block_id] -= 1
            if self._refcounts[block_id] == 0:
                if block_id in self._hash_of_block:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Publish a held, fully computed block under its content hash. Returns False (block stays
        private) when caching is off or another block already holds the same content."""
        if not self.enable_prefix_caching or block_hash in self._block_of_hash:
            return False
        if self._refcounts[block_id] < 1 or block_id in self._hash_of_block:
            raise IntegrityError(f"block {block_id} cannot be cached: not held, or cached already")
        self._hash_of_block[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        if self._cache_events is not None:
            self._cache_events[0].append(block_hash)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's content; unreferenced cached blocks become free."""
        for block_id in self._evictable:
            self._free.append(block_id)
        if self._cache_events is not None:
            self._cache_events[1].extend(self._block_of_hash)
        self._evictable.clear()
        self._hash_of_block.clear()
        self._block_of_hash.clear()

    def _evict_oldest(self) -> int:
        block_id, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of_block.pop(block_id)
        del self._block_of_hash[block_hash]
        if self._cache_events is not None:
            self._cache_events[1].append(block_hash)
        self.num_evictions += 1
        return block_id

    # -- invariants ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise IntegrityError unless every block is exactly one of free, cached or held (I1)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise IntegrityError("a block appears twice in the free list")
        both = free & self._evictable.keys()
        if both:
            raise IntegrityError(f"blocks both free and cached: {sorted(both)}")
        for block_id in range(self.num_blocks):
            refs = self._refcounts[block_id]
            cached = block_id in self._hash_of_block
            if refs < 0:
                raise IntegrityError(f"block {block_id} has refcount {refs}")
            if refs == 0 and block_id not in free and block_id not in self._evictable:
                raise IntegrityError(f"block {block_id} has refcount 0 but is neither free nor cached")
            if refs > 0 and (block_id in free or block_id in self._evictable):
                raise IntegrityError(f"block {block_id} is held (refcount {refs}) and also listed as free")
            if block_id in free and cached:
                raise IntegrityError(f"free block {block_id} still has a content hash")
            if block_id in self._evictable and not cached:
                raise IntegrityError(f"evictable block {block_id} has no content hash")
        for block_hash, block_id in self._block_of_hash.items():
            if self._hash_of_block.get(block_id) != block_hash:
                raise IntegrityError(f"hash index and block {block_id} disagree")
        if len(self._block_of_hash) != len(self._hash_of_block):
            raise IntegrityError("hash index and block hashes differ in size")
