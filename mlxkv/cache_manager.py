"""KVCacheManager: the request-level API over BlockPool + PrefixIndex (no mlx arrays).

Layer groups (mlxkv.kv_spec) each have a BlockPool, a PrefixIndex and one block table per
request; all groups share the request's token count and chained block hashes. Slots are
`block_id * block_size + offset`. A table is a persistent, growable numpy int32 array
(`mlxkv.block_table.BlockTable`) that allocations append to, so a step reads tables and computes slots in
numpy, in time proportional to its new tokens (plus one copy of the table row).

Invariants (docs/kv-store.md; asserted by `check_invariants`):
  * a block's ref_count equals the number of tables (over all requests) holding it;
  * only full blocks whose tokens are final are hashed (`commit`); a hashed block is never
    written: `allocate_slots` copies it (COW, ref_count > 1) or un-hashes it (sole owner);
  * allocation failure returns None and changes nothing; requests release tail first;
  * sliding-window groups replace blocks that fell wholly out of the window with the null
    block 0 and release them.

    table (block_size 4)   [ b7 | b3 | b9 | b2 ]      num_tokens = 14
    token positions          0-3  4-7  8-11 12-13      b2 is the partial tail (2 free slots)
    trim(…, 9)             [ b7 | b3 | b9 ]           b2 freed; b9 now partial: un-hashed if
                                                      ours alone, copied on next write if shared
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlxkv.block_table import BlockTable
from mlxkv.blocks import NULL_BLOCK, BlockPool
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.prefix import HashFn, PrefixIndex, chain_hashes, hash_block_tokens


@dataclass(slots=True)
class Allocation:
    """Result of a successful allocate_slots: opaque to the scheduler, used by the engine.

    new_block_ids[g]: blocks appended to group g's table this call.
    cow_copies[g]: (src, dst) block copies the KVStore must perform before this step's writes.
    """

    new_block_ids: list[list[int]] = field(default_factory=list)
    cow_copies: list[list[tuple[int, int]]] = field(default_factory=list)


@dataclass(slots=True)
class _Seq:
    tables: list[BlockTable]
    num_tokens: int = 0
    hashes: list[int] = field(default_factory=list)  # chained hashes of committed blocks


class _Group:
    def __init__(self, spec: KVGroupSpec, num_blocks: int):
        self.spec = spec
        self.index = PrefixIndex()
        self.pool = BlockPool(num_blocks, on_evict=lambda b, h: self.index.forget(h, b))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables, prefix sharing, COW, trim and eviction for every request."""

    def __init__(
        self,
        groups: Sequence[KVGroupSpec],
        num_blocks: Sequence[int] | int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        hash_salt: bytes = b"",
        hash_fn: HashFn = hash_block_tokens,
    ):
        if isinstance(num_blocks, int):
            num_blocks = [num_blocks] * len(groups)
        self.groups = [_Group(spec, n) for spec, n in zip(groups, num_blocks, strict=True)]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_salt = hash_salt
        self.hash_fn = hash_fn
        self._seqs: dict[str, _Seq] = {}
        self.counters = {"lookups": 0, "hit_requests": 0, "query_tokens": 0, "hit_tokens": 0}

    # -- queries -----------------------------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        return request_id in self._seqs

    def num_tokens(self, request_id: str) -> int:
        """Tokens that have slots for request_id (0 when unknown)."""
        seq = self._seqs.get(request_id)
        return seq.num_tokens if seq else 0

    def block_tables(self, request_id: str) -> list[list[int]]:
        """Per group, the request's block ids in token order (null block 0 = out of window)."""
        return [t.tolist() for t in self._seqs[request_id].tables]

    def block_table_arrays(self, request_id: str) -> list[np.ndarray]:
        """block_tables as int32 arrays: views, valid until the request's next allocation."""
        return [t.view() for t in self._seqs[request_id].tables]

    def num_free_blocks(self) -> list[int]:
        return [g.pool.num_free_blocks for g in self.groups]

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[list[int]]:
        """Per group, slots of token positions start..end-1 (which must have slots)."""
        return [a.tolist() for a in self.slot_arrays(request_id, start, end)]

    def slot_arrays(self, request_id: str, start: int, end: int) -> list[np.ndarray]:
        """slot_mapping as int32 arrays, computed vectorised (cost ~ end - start)."""
        bs, seq = self.block_size, self._seqs[request_id]
        if end - start <= 2:  # decode rows: scalar arithmetic beats numpy's per-call cost
            return [np.array([int(t._buf[p // bs]) * bs + p % bs for p in range(start, end)],
                             dtype=np.int32) for t in seq.tables]
        pos = np.arange(start, end, dtype=np.int32)
        block, offset = pos // bs, pos % bs
        return [t.view()[block] * bs + offset for t in seq.tables]

    def _blocks_needed(self, group: _Group, num_tokens: int, chunk: int) -> int:
        """Live blocks group needs for a sequence of num_tokens written chunk tokens at a time."""
        total = _cdiv(num_tokens, self.block_size)
        window = group.spec.sliding_window
        if window is None:
            return total
        return min(total, _cdiv(window - 1 + chunk, self.block_size) + 1)

    def can_ever_fit(self, num_tokens: int, chunk: int = 512) -> bool:
        """Whether a sequence of num_tokens fits in an otherwise empty pool."""
        return all(
            self._blocks_needed(g, num_tokens, min(chunk, num_tokens)) <= g.pool.num_blocks - 1
            for g in self.groups
        )

    def can_allocate(self, request_id: str, num_new_tokens: int) -> bool:
        return all(
            need <= g.pool.num_free_blocks
            for g, need in zip(self.groups, self._demand(request_id, num_new_tokens), strict=True)
        )

    def can_trim(self, request_id: str, num_tokens: int) -> bool:
        """Whether trim(request_id, num_tokens) keeps every block the next write needs."""
        seq = self._seqs.get(request_id)
        if seq is None or not 0 <= num_tokens <= seq.num_tokens:
            return False
        for g, table in zip(self.groups, seq.tables, strict=True):
            window = g.spec.sliding_window
            if window is not None and num_tokens > 0:
                first = max(0, num_tokens - window + 1) // self.block_size
                if any(b == NULL_BLOCK for b in table[first : _cdiv(num_tokens, self.block_size)]):
                    return False
        return True

    # -- lookup / allocate ---------------------------------------------------------------
    def lookup(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Attach the longest cached prefix of full blocks (at most len(token_ids) - 1 tokens)
        to a new table for request_id, taking a ref on each block. Returns num cached tokens.
        A hit counts only when every group holds the block."""
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} already has a table")
        seq = _Seq(tables=[BlockTable() for _ in self.groups])
        self._seqs[request_id] = seq
        self.counters["lookups"] += 1
        self.counters["query_tokens"] += len(token_ids)
        if not self.enable_prefix_caching or len(token_ids) < 2:
            return 0
        bs = self.block_size
        hashes = chain_hashes(token_ids, bs, (len(token_ids) - 1) // bs, self.hash_salt,
                              self.hash_fn)
        hits: list[list[int]] = [[] for _ in self.groups]
        for i, h in enumerate(hashes):
            block_tokens = token_ids[i * bs : (i + 1) * bs]
            found = [g.index.get(h, block_tokens) for g in self.groups]
            if any(b is None for b in found):
                break
            for gi, b in enumerate(found):
                hits[gi].append(b)
        num_hit = len(hits[0]) if hits else 0
        for g, table, blocks in zip(self.groups, seq.tables, hits, strict=True):
            for b in blocks:
                g.pool.touch(b)
                table.append(b)
        seq.num_tokens = num_hit * bs
        seq.hashes = hashes[:num_hit]
        if num_hit:
            self.counters["hit_requests"] += 1
            self.counters["hit_tokens"] += num_hit * bs
        return num_hit * bs

    def _demand(self, request_id: str, num_new_tokens: int) -> list[int]:
        seq = self._seqs.get(request_id)
        num_tokens = seq.num_tokens if seq else 0
        bs, out = self.block_size, []
        for gi, g in enumerate(self.groups):
            have = len(seq.tables[gi]) if seq else 0
            need = max(0, _cdiv(num_tokens + num_new_tokens, bs) - have)
            if seq and num_tokens % bs and num_new_tokens:
                tail = seq.tables[gi][-1]
                need += g.pool.ref_count[tail] > 1
            out.append(need)
        return out

    def allocate_slots(self, request_id: str, num_new_tokens: int) -> Allocation | None:
        """Ensure slots for the next num_new_tokens tokens of request_id (creating its table if
        needed); copy-on-write a shared partial tail. None (and no change) when blocks are short."""
        if not self.can_allocate(request_id, num_new_tokens):
            return None
        seq = self._seqs.get(request_id)
        if seq is None:
            seq = self._seqs[request_id] = _Seq(tables=[BlockTable() for _ in self.groups])
        alloc = Allocation()
        bs, start = self.block_size, seq.num_tokens
        for g, table in zip(self.groups, seq.tables, strict=True):
            copies: list[tuple[int, int]] = []
            if start % bs and num_new_tokens:
                self._prepare_tail(g, table, copies)
            new = []
            while len(table) < _cdiv(start + num_new_tokens, bs):
                block_id = g.pool.allocate()
                assert block_id is not None  # guaranteed by can_allocate
                table.append(block_id)
                new.append(block_id)
            alloc.new_block_ids.append(new)
            alloc.cow_copies.append(copies)
            self._drop_out_of_window(g, table, start)
        seq.num_tokens = start + num_new_tokens
        return alloc

    def _prepare_tail(self, g: _Group, table: BlockTable, copies: list) -> None:
        """Make the partial tail block writable: COW when shared, un-hash when ours alone."""
        tail = table[-1]
        if g.pool.ref_count[tail] > 1:
            dst = g.pool.allocate()
            assert dst is not None
            copies.append((tail, dst))
            g.pool.free(tail)
            table[-1] = dst
        elif g.pool.block_hash[tail] is not None:
            g.index.forget(g.pool.block_hash[tail], tail)
            g.pool.clear_hash(tail)

    def _drop_out_of_window(self, g: _Group, table: BlockTable, chunk_start: int) -> None:
        window = g.spec.sliding_window
        if window is None:
            return
        head = table.view()[: max(0, chunk_start - window + 1) // self.block_size]
        for i in np.flatnonzero(head != NULL_BLOCK).tolist():  # usually none or one
            g.pool.free(int(head[i]))
            head[i] = NULL_BLOCK

    # -- commit / fork / trim / free -----------------------------------------------------
    def commit(self, request_id: str, token_ids: Sequence[int], num_final_tokens: int) -> None:
        """Hash and index every full block within the first num_final_tokens tokens."""
        seq = self._seqs[request_id]
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(num_final_tokens, seq.num_tokens, len(token_ids)) // bs
        parent = seq.hashes[-1] if seq.hashes else None
        new = chain_hashes(token_ids, bs, num_full, self.hash_salt, self.hash_fn,
                           start=len(seq.hashes), parent=parent)
        for offset, h in enumerate(new):
            i = len(seq.hashes) + offset
            block_tokens = token_ids[i * bs : (i + 1) * bs]
            for g, table in zip(self.groups, seq.tables, strict=True):
                b = table[i]
                if b != NULL_BLOCK and g.pool.block_hash[b] is None and g.index.insert(
                    h, b, block_tokens
                ):
                    g.pool.set_hash(b, h)
        seq.hashes.extend(new)

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give child_id a table sharing every parent block (ref counts +1, no copies)."""
        if child_id in self._seqs:
            raise ValueError(f"request {child_id!r} already has a table")
        parent = self._seqs[parent_id]
        for g, table in zip(self.groups, parent.tables, strict=True):
            for b in table:
                if b != NULL_BLOCK:
                    g.pool.touch(b)
        self._seqs[child_id] = _Seq(
            tables=[t.copy() for t in parent.tables],
            num_tokens=parent.num_tokens,
            hashes=list(parent.hashes),
        )

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Rewind request_id to its first num_tokens tokens (free tail blocks tail first; a now
        partial block is un-hashed or copied on the next write).

        Raises:
            ValueError: num_tokens out of range, or a sliding window already dropped blocks
                the rewound sequence needs (see can_trim).
        """
        if not self.can_trim(request_id, num_tokens):
            raise ValueError(f"cannot trim {request_id!r} to {num_tokens} tokens")
        seq = self._seqs[request_id]
        keep = _cdiv(num_tokens, self.block_size)
        for g, table in zip(self.groups, seq.tables, strict=True):
            while len(table) > keep:
                g.pool.free(table.pop())
        seq.num_tokens = num_tokens
        del seq.hashes[num_tokens // self.block_size :]

    def free(self, request_id: str) -> None:
        """Release request_id's blocks tail first (cached ones become evictable). Idempotent."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        for g, table in zip(self.groups, seq.tables, strict=True):
            for b in reversed(table):
                g.pool.free(b)

    def evict_all_cached(self) -> int:
        return sum(g.pool.evict_all_cached() for g in self.groups)

    # -- introspection -------------------------------------------------------------------
    def usage(self) -> float:
        """Fraction of usable blocks referenced by requests (max over groups)."""
        return max(g.pool.num_used_blocks / (g.pool.num_blocks - 1) for g in self.groups)

    def stats(self, bytes_per_block: Sequence[int] | None = None) -> dict:
        """blocks total/used/cached/free (summed and per group), bytes, hits, misses, evictions."""
        per_group = []
        for gi, g in enumerate(self.groups):
            p = g.pool
            per_group.append({
                "layers": len(g.spec.layer_ids), "sliding_window": g.spec.sliding_window,
                "blocks_total": p.num_blocks - 1, "blocks_used": p.num_used_blocks,
                "blocks_cached": p.num_cached_blocks, "blocks_free": len(p._free),
                "evictions": p.num_evictions,
                "bytes_per_block": bytes_per_block[gi] if bytes_per_block else None,
            })
        total = {k: sum(s[k] for s in per_group) for k in
                 ("blocks_total", "blocks_used", "blocks_cached", "blocks_free", "evictions")}
        c = self.counters
        out = {
            **total, "block_size": self.block_size, "num_requests": len(self._seqs),
            "prefix_caching": self.enable_prefix_caching, "lookups": c["lookups"],
            "hits": c["hit_requests"], "misses": c["lookups"] - c["hit_requests"],
            "hit_tokens": c["hit_tokens"], "query_tokens": c["query_tokens"],
            "hit_rate": c["hit_tokens"] / c["query_tokens"] if c["query_tokens"] else 0.0,
            "groups": per_group,
        }
        if bytes_per_block:
            out["bytes_total"] = sum(s["blocks_total"] * s["bytes_per_block"] for s in per_group)
            out["bytes_used"] = sum(s["blocks_used"] * s["bytes_per_block"] for s in per_group)
        return out

    def check_invariants(self) -> None:
        """Assert the module invariants for every group (tests call this after each op)."""
        for gi, g in enumerate(self.groups):
            refs: dict[int, int] = {}
            for seq in self._seqs.values():
                assert len(seq.tables[gi]) == _cdiv(seq.num_tokens, self.block_size)
                for b in seq.tables[gi]:
                    if b != NULL_BLOCK:
                        refs[b] = refs.get(b, 0) + 1
            g.pool.check_invariants(refs)
            for b in range(1, g.pool.num_blocks):
                h = g.pool.block_hash[b]
                if h is not None:
                    assert g.index.block_of(h) == b, f"hashed block {b} missing from the index"
            assert len(g.index) == sum(h is not None for h in g.pool.block_hash)
