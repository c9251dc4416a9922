"""Chained content hashes of full KV blocks: the identity of a prefix, stable across processes.

The hash of block i covers the hash of block i-1 and block i's token ids, so equal hashes mean equal
prefixes (up to a 128-bit collision). Stable across processes and machines so the router and the
Redis prefix index can compare hashes computed by different workers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes
"""16-byte blake2b digest."""

_ROOT = b"baton-kv-v1"


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash one full block given its parent's hash (None for the first block)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent if parent is not None else _ROOT)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, hashes: list[BlockHash]) -> None:
    """Extend `hashes` in place so it covers every full block of `token_ids`."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
