from __future__ import annotations

import pytest

from baton.shared.engine.block_hash import hash_block
from baton.shared.engine.block_pool import BlockPool, BlockUsage, IntegrityError


def h(i: int) -> bytes:
    return hash_block(None, [i])


def test_allocate_hands_out_lowest_free_blocks_first() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(2) == [2, 3]
    assert pool.allocate(1) is None
    pool.check_integrity()


def test_allocate_that_does_not_fit_takes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_freed_uncached_blocks_return_to_the_free_list() -> None:
    pool = BlockPool(3)
    a = pool.allocate(3)
    pool.free(a)
    assert pool.usage() == BlockUsage(num_free=3, num_cached=0, num_held=0)
    pool.check_integrity()


def test_cached_blocks_survive_free_and_are_found_by_hash() -> None:
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    assert pool.cache_block(b, h(1))
    pool.free([b])
    assert pool.usage() == BlockUsage(num_free=3, num_cached=1, num_held=0)
    assert pool.lookup(h(1)) == b
    pool.touch([b])  # a prefix hit revives it
    assert pool.refcount(b) == 1 and not pool.is_evictable(b)
    pool.check_integrity()


def test_free_blocks_are_used_before_cached_ones_are_evicted() -> None:
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.cache_block(b, h(1))
    pool.free([b])
    assert pool.allocate(2) == [1, 2]
    assert pool.lookup(h(1)) == 0
    assert pool.allocate(1) == [0]  # now it is evicted
    assert pool.lookup(h(1)) is None
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_eviction_is_least_recently_used_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, h(i))
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])
    assert pool.allocate(1) == [blocks[1]]
    assert pool.allocate(1) == [blocks[0]]
    assert pool.lookup(h(2)) == blocks[2]
    pool.check_integrity()


def test_shared_block_needs_every_holder_to_free_it() -> None:
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.cache_block(b, h(7))
    pool.touch([b])
    assert pool.refcount(b) == 2
    pool.free([b])
    assert pool.usage().num_held == 1
    pool.free([b])
    assert pool.usage() == BlockUsage(num_free=1, num_cached=1, num_held=0)
    pool.check_integrity()


def test_duplicate_content_stays_private() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, h(1))
    assert not pool.cache_block(b, h(1))
    pool.free([b])
    assert pool.usage().num_free == 1  # b was never cached
    pool.check_integrity()


def test_prefix_caching_off_never_caches() -> None:
    pool = BlockPool(2, enable_prefix_caching=False)
    [a] = pool.allocate(1)
    assert not pool.cache_block(a, h(1))
    assert pool.lookup(h(1)) is None


def test_reset_prefix_cache_frees_unreferenced_cached_blocks() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, h(1))
    pool.cache_block(b, h(2))
    pool.free([a])
    pool.reset_prefix_cache()
    assert pool.usage() == BlockUsage(num_free=1, num_cached=0, num_held=1)
    pool.free([b])
    assert pool.usage().num_free == 2
    pool.check_integrity()


def test_double_free_is_refused() -> None:
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    pool.free([a])
    with pytest.raises(IntegrityError, match="refcount 0"):
        pool.free([a])


def test_check_integrity_detects_corruption() -> None:
    pool = BlockPool(3)
    pool.allocate(1)
    pool._refcounts[0] = 0  # held block lost its holder without going back to the free list
    with pytest.raises(IntegrityError, match="block 0"):
        pool.check_integrity()


def test_block_hashes_chain_over_parents() -> None:
    first = hash_block(None, [1, 2])
    assert hash_block(first, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) == first  # stable
    assert len(first) == 16


def test_cache_events_report_cached_and_evicted_hashes() -> None:
    pool = BlockPool(2)
    pool.track_cache_events()
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h-a")
    pool.cache_block(b, b"h-b")
    pool.free([b, a])
    assert pool.drain_cache_events() == ([b"h-a", b"h-b"], [])
    pool.allocate(1)  # evicts the least recently freed: b (freed first)
    assert pool.drain_cache_events() == ([], [b"h-b"])
    pool.reset_prefix_cache()
    assert pool.drain_cache_events() == ([], [b"h-a"])
    assert pool.cached_hashes == []
