"""PrefixIndex: chained block hashes -> block id, with a token-id check against collisions.

A block's hash is H(parent_hash, its token ids, salt), so equal hashes mean equal whole
prefixes (up to collisions). The index also keeps each block's token ids, and a hit is
only reported when they match, so a forced hash collision can never return wrong KV.
Invariant: an entry exists iff its block is hashed in the pool (committed and not evicted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HashFn = Callable[[int | None, Sequence[int], bytes], int]


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], salt: bytes = b"") -> int:
    """Stable 64-bit chained hash of one full block (blake2b; not Python's randomised hash)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(salt)
    h.update((parent_hash if parent_hash is not None else -1).to_bytes(9, "little", signed=True))
    h.update(b",".join(str(t).encode() for t in token_ids))
    return int.from_bytes(h.digest(), "little")


def chain_hashes(
    token_ids: Sequence[int], block_size: int, num_blocks: int, salt: bytes, hash_fn: HashFn,
    start: int = 0, parent: int | None = None,
) -> list[int]:
    """Hashes of full blocks start..num_blocks-1 of token_ids, chained from `parent`."""
    out = []
    for i in range(start, num_blocks):
        parent = hash_fn(parent, token_ids[i * block_size : (i + 1) * block_size], salt)
        out.append(parent)
    return out


class PrefixIndex:
    """Map block hash -> (block id, token ids). One index per block pool."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """The block holding exactly these tokens under this hash, else None."""
        entry = self._entries.get(block_hash)
        if entry is None or entry[1] != tuple(token_ids):
            return None
        return entry[0]

    def contains(self, block_hash: int) -> bool:
        return block_hash in self._entries

    def insert(self, block_hash: int, block_id: int, token_ids: Sequence[int]) -> bool:
        """Index a committed block. False (no change) when the hash is already taken."""
        if block_hash in self._entries:
            return False
        self._entries[block_hash] = (block_id, tuple(token_ids))
        return True

    def forget(self, block_hash: int, block_id: int) -> None:
        """Remove the entry if it still points at block_id."""
        entry = self._entries.get(block_hash)
        if entry is not None and entry[0] == block_id:
            del self._entries[block_hash]

    def block_of(self, block_hash: int) -> int | None:
        entry = self._entries.get(block_hash)
        return None if entry is None else entry[0]
