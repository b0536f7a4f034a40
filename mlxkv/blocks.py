"""BlockPool: block ids, ref counts and the LRU of evictable cached blocks. No mlx, no requests.

Invariants (checked by `check_invariants`):
  1. Conservation: every block id except the reserved null block 0 is in exactly one state:
     free-unhashed (in `_free`), evictable (ref_count 0 with a hash, in `_evictable`), or in
     use (ref_count > 0).
  2. A block leaves the evictable LRU only by `touch` (a prefix hit) or by eviction inside
     `allocate`, which clears its hash (the owner's `on_evict` callback forgets it).
  3. The LRU is ordered by a logical clock: the order in which blocks reached ref_count 0.
     Callers release a table tail first, so the deepest blocks of a chain are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

NULL_BLOCK = 0


class BlockPool:
    """Fixed set of `num_blocks` block ids (0 is reserved) with ref counts and an LRU."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int, int], None] | None = None):
        """Args:
        num_blocks: total ids including the null block 0 (so num_blocks - 1 usable).
        on_evict: called as on_evict(block_id, block_hash) when a cached block is evicted.
        """
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._on_evict = on_evict
        self.num_evictions = 0

    # -- queries -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now (free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Evictable blocks: unreferenced but still matchable by a prefix lookup."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    def evictable_order(self) -> list[int]:
        """Evictable block ids, next victim first."""
        return list(self._evictable)

    # -- mutations ---------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A block with ref_count 1: a free one, else the LRU evictable one. None when none."""
        if self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            old_hash = self.block_hash[block_id]
            self.block_hash[block_id] = None
            self.num_evictions += 1
            if self._on_evict is not None and old_hash is not None:
                self._on_evict(block_id, old_hash)
        else:
            return None
        self.ref_count[block_id] = 1
        return block_id

    def touch(self, block_id: int) -> None:
        """Take one more reference (a prefix hit or a fork); leaves the LRU if it was there."""
        if self.ref_count[block_id] == 0:
            if block_id not in self._evictable:
                raise ValueError(f"touch of free block {block_id}")
            del self._evictable[block_id]
        self.ref_count[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drop one reference; at 0 a hashed block becomes evictable, an unhashed one free."""
        if block_id == NULL_BLOCK:
            return
        if self.ref_count[block_id] <= 0:
            raise ValueError(f"double free of block {block_id}")
        self.ref_count[block_id] -= 1
        if self.ref_count[block_id] == 0:
            if self.block_hash[block_id] is not None:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)

    def set_hash(self, block_id: int, block_hash: int) -> None:
        if self.ref_count[block_id] <= 0:
            raise ValueError(f"hashing unreferenced block {block_id}")
        self.block_hash[block_id] = block_hash

    def clear_hash(self, block_id: int) -> None:
        """Forget a referenced block's hash (it is about to be written)."""
        if self.ref_count[block_id] <= 0:
            raise ValueError(f"un-hashing unreferenced block {block_id}")
        self.block_hash[block_id] = None

    def evict_all_cached(self) -> int:
        """Turn every evictable block into a free one (benchmarks, tests). Returns the count."""
        count = 0
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            old_hash = self.block_hash[block_id]
            self.block_hash[block_id] = None
            if self._on_evict is not None and old_hash is not None:
                self._on_evict(block_id, old_hash)
            self._free.append(block_id)
            count += 1
        self.num_evictions += count
        return count

    def check_invariants(self, expected_ref_counts: dict[int, int]) -> None:
        """Assert conservation and that ref counts equal the table counts given."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate id in free list"
        assert not free & evictable, "block both free and evictable"
        assert NULL_BLOCK not in free | evictable, "null block in circulation"
        for block_id in range(1, self.num_blocks):
            ref = self.ref_count[block_id]
            assert ref == expected_ref_counts.get(block_id, 0), (
                f"block {block_id}: ref_count {ref} != {expected_ref_counts.get(block_id, 0)}"
            )
            if block_id in free:
                assert ref == 0 and self.block_hash[block_id] is None, f"bad free block {block_id}"
            elif block_id in evictable:
                assert ref == 0 and self.block_hash[block_id] is not None, f"bad cached {block_id}"
            else:
                assert ref > 0, f"block {block_id} leaked (ref 0, in no list)"
