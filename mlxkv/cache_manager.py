"""KVCacheManager: the request-level API over BlockPool + PrefixIndex + KVStore.

INTERFACE STUB (issue #3 implements it). The scheduler and engine code against exactly
these signatures; the implementation may add methods but must not change these.

Layer groups: layers with the same (sliding_window, num_kv_heads, head_dim) form a group
with its own BlockPool and one block table per request. Block id 0 of every group is the
reserved null block: sliding groups put it in table entries whose block fell out of the
window. Slots are `block_id * block_size + offset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mlxkv.kv_spec import KVGroupSpec  # noqa: F401  (re-exported)


@dataclass(slots=True)
class Allocation:
    """Result of a successful allocate_slots: opaque to the scheduler, used by the engine.

    new_block_ids[g]: blocks appended to group g's table this call.
    cow_copies[g]: (src, dst) block copies the KVStore must perform before this step's writes.
    """

    new_block_ids: list[list[int]] = field(default_factory=list)
    cow_copies: list[list[tuple[int, int]]] = field(default_factory=list)


class KVCacheManager:
    """Signatures only; see issue #3."""

    def lookup(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Attach the longest cached prefix of full blocks (at most len(token_ids) - 1 tokens)
        to a new table for request_id, taking a ref on each block. Returns num cached tokens."""
        raise NotImplementedError

    def allocate_slots(self, request_id: str, num_new_tokens: int) -> Allocation | None:
        """Ensure slots for the next num_new_tokens tokens of request_id (creating its table if
        needed); copy-on-write a shared partial tail. None (and no change) when blocks are short."""
        raise NotImplementedError

    def commit(self, request_id: str, token_ids: Sequence[int], num_final_tokens: int) -> None:
        """Hash and index every full block within the first num_final_tokens tokens."""
        raise NotImplementedError

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give child_id a table sharing every parent block (ref counts +1, no copies)."""
        raise NotImplementedError

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Rewind request_id to its first num_tokens tokens (free tail blocks, un-hash a now
        partial block; a shared partial block is copied on the next write)."""
        raise NotImplementedError

    def free(self, request_id: str) -> None:
        """Release request_id's blocks tail first (cached ones become evictable). Idempotent."""
        raise NotImplementedError

    def block_tables(self, request_id: str) -> list[list[int]]:
        """Per group, the request's block ids in token order."""
        raise NotImplementedError

    def num_tokens(self, request_id: str) -> int:
        """Tokens that have slots for request_id."""
        raise NotImplementedError

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits in an otherwise empty pool."""
        raise NotImplementedError

    def stats(self) -> dict:
        """blocks total/used/cached/free per group, bytes, hits, misses, evictions."""
        raise NotImplementedError
