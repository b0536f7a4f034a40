"""Control-plane tests: exact block ids, exact eviction order, COW, trim, collisions, a sweep."""

from __future__ import annotations

import random

import pytest

from mlxkv.blocks import BlockPool
from mlxkv.cache_manager import KVCacheManager
from mlxkv.kv_spec import KVGroupSpec, make_group_specs

FULL = KVGroupSpec(layer_ids=(0, 1), num_kv_heads=2, head_dim=8)


def manager(num_blocks=9, block_size=4, groups=(FULL,), **kw) -> KVCacheManager:
    return KVCacheManager(list(groups), num_blocks, block_size, **kw)


def run(mgr, rid, token_ids):
    """Admit a request: lookup, allocate the rest, commit everything (as the engine does)."""
    cached = mgr.lookup(rid, token_ids)
    assert mgr.allocate_slots(rid, len(token_ids) - cached) is not None
    mgr.commit(rid, token_ids, len(token_ids))
    mgr.check_invariants()
    return cached


def test_pool_allocates_lowest_ids_and_reserves_null_block():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [1, 2, 3]
    assert pool.allocate() is None
    pool.free(2)
    assert pool.allocate() == 2
    with pytest.raises(ValueError):
        BlockPool(1)


def test_double_free_is_rejected():
    pool = BlockPool(3)
    b = pool.allocate()
    pool.free(b)
    with pytest.raises(ValueError):
        pool.free(b)


def test_exact_block_ids_and_slots():
    mgr = manager()
    run(mgr, "a", list(range(10)))
    assert mgr.block_tables("a") == [[1, 2, 3]]
    assert mgr.slot_mapping("a", 7, 10) == [[2 * 4 + 3, 3 * 4 + 0, 3 * 4 + 1]]
    assert mgr.num_tokens("a") == 10


def test_shared_prefix_increases_ref_counts_with_zero_copies():
    mgr = manager()
    run(mgr, "a", list(range(10)))
    cached = mgr.lookup("b", list(range(8)) + [99, 98, 97])
    assert cached == 8
    alloc = mgr.allocate_slots("b", 3)
    assert alloc.cow_copies == [[]] and alloc.new_block_ids == [[4]]
    assert mgr.block_tables("b") == [[1, 2, 4]]
    pool = mgr.groups[0].pool
    assert (pool.ref_count[1], pool.ref_count[2], pool.ref_count[3]) == (2, 2, 1)
    mgr.check_invariants()


def test_lookup_leaves_last_token_uncached():
    mgr = manager()
    run(mgr, "a", list(range(8)))
    mgr.free("a")
    assert mgr.lookup("b", list(range(8))) == 4  # block 2 holds the last token: recompute it
    mgr.check_invariants()


def test_eviction_is_lru_and_tail_first():
    mgr = manager(num_blocks=7)
    run(mgr, "a", list(range(8)))  # blocks 1, 2
    run(mgr, "b", list(range(100, 112)))  # blocks 3, 4, 5
    mgr.free("a")
    mgr.free("b")
    pool = mgr.groups[0].pool
    assert pool.evictable_order() == [2, 1, 5, 4, 3]
    run(mgr, "c", list(range(200, 212)))  # one free block (6), then evicts 2 and 1
    assert mgr.block_tables("c") == [[6, 2, 1]]
    assert pool.num_evictions == 2
    assert mgr.lookup("d", list(range(8)) + [0]) == 0  # a's chain is gone
    assert mgr.lookup("e", list(range(100, 112)) + [0]) == 12  # b's chain survives
    mgr.check_invariants()


def test_hit_touches_and_refreshes_lru():
    mgr = manager(num_blocks=5)
    run(mgr, "a", list(range(8)))
    mgr.free("a")
    assert mgr.lookup("b", list(range(8)) + [1]) == 8
    assert mgr.groups[0].pool.evictable_order() == []
    mgr.free("b")
    assert mgr.groups[0].pool.evictable_order() == [2, 1]
    mgr.check_invariants()


def test_cow_on_divergence_after_fork():
    mgr = manager()
    run(mgr, "a", list(range(6)))  # blocks 1 (full), 2 (partial, 2 tokens)
    mgr.fork("a", "a1")
    assert mgr.groups[0].pool.ref_count[2] == 2
    alloc = mgr.allocate_slots("a1", 1)
    assert alloc.cow_copies == [[(2, 3)]]
    assert mgr.block_tables("a1") == [[1, 3]] and mgr.block_tables("a") == [[1, 2]]
    assert mgr.groups[0].pool.ref_count[2] == 1
    mgr.check_invariants()


def test_allocation_failure_returns_none_and_changes_nothing():
    mgr = manager(num_blocks=3)
    run(mgr, "a", list(range(5)))
    before = mgr.stats()
    assert mgr.allocate_slots("a", 4) is None
    assert mgr.stats() == before and mgr.num_tokens("a") == 5
    mgr.check_invariants()


def test_trim_across_shared_block_copies_on_next_write():
    mgr = manager()
    run(mgr, "a", list(range(12)))  # 1, 2, 3 all full and hashed
    assert mgr.lookup("b", list(range(12)) + [5]) == 12
    mgr.allocate_slots("b", 1)
    mgr.trim("b", 6)  # block 2 now partial for b, still shared with a
    assert mgr.block_tables("b") == [[1, 2]]
    mgr.check_invariants()
    alloc = mgr.allocate_slots("b", 1)
    assert alloc.cow_copies == [[(2, 5)]]
    assert mgr.block_tables("b") == [[1, 5]]
    assert mgr.lookup("c", list(range(12)) + [0]) == 12  # a's chain still intact
    mgr.check_invariants()


def test_trim_unhashes_a_private_block():
    mgr = manager()
    run(mgr, "a", list(range(8)))
    mgr.trim("a", 5)
    alloc = mgr.allocate_slots("a", 1)
    assert alloc.cow_copies == [[]]
    assert mgr.groups[0].pool.block_hash[2] is None
    assert mgr.lookup("b", list(range(8)) + [1]) == 4
    mgr.check_invariants()


def test_hash_collision_is_caught_by_token_check():
    mgr = manager(hash_fn=lambda parent, tokens, salt: 42)
    run(mgr, "a", [1, 2, 3, 4, 5])
    assert mgr.lookup("b", [9, 9, 9, 9, 5]) == 0
    mgr.check_invariants()


def test_sliding_window_group_drops_blocks_out_of_window():
    groups = make_group_specs([4, None], [1, 1], [8, 8])
    mgr = manager(num_blocks=20, groups=groups)
    mgr.lookup("a", list(range(20)))
    mgr.allocate_slots("a", 12)
    mgr.allocate_slots("a", 8)  # chunk starts at 12: needs keys from 9 on
    sliding, full = mgr.block_tables("a")
    assert sliding[:2] == [0, 0] and all(sliding[2:])
    assert all(full)
    assert not mgr.can_trim("a", 6) and mgr.can_trim("a", 18)
    mgr.check_invariants()
    mgr.free("a")
    mgr.check_invariants()


def test_can_ever_fit_and_stats():
    mgr = manager(num_blocks=5)
    assert mgr.can_ever_fit(16) and not mgr.can_ever_fit(17)
    run(mgr, "a", list(range(8)))
    s = mgr.stats(bytes_per_block=[100])
    assert (s["blocks_total"], s["blocks_used"], s["blocks_free"]) == (4, 2, 2)
    assert s["bytes_used"] == 200 and s["lookups"] == 1 and s["misses"] == 1
    mgr.free("a")
    assert mgr.stats()["blocks_cached"] == 2


def test_randomized_sweep_keeps_invariants():
    rng = random.Random(0)
    groups = make_group_specs([None, 8], [2, 2], [8, 8])
    mgr = manager(num_blocks=40, block_size=4, groups=groups)
    tokens: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(10_000):
        op = rng.random()
        live = list(tokens)
        if op < 0.25 or not live:
            rid = f"r{next_id}"
            next_id += 1
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]
            cached = mgr.lookup(rid, prompt)
            if mgr.allocate_slots(rid, len(prompt) - cached) is None:
                mgr.free(rid)
            else:
                tokens[rid] = prompt
                mgr.commit(rid, prompt, len(prompt))
        elif op < 0.55:
            rid = rng.choice(live)
            new = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
            if mgr.allocate_slots(rid, len(new)) is not None:
                tokens[rid] += new
                mgr.commit(rid, tokens[rid], len(tokens[rid]))
        elif op < 0.65:
            rid, child = rng.choice(live), f"r{next_id}"
            next_id += 1
            mgr.fork(rid, child)
            tokens[child] = list(tokens[rid])
        elif op < 0.8:
            rid = rng.choice(live)
            n = rng.randrange(0, len(tokens[rid]) + 1)
            if mgr.can_trim(rid, n):
                mgr.trim(rid, n)
                del tokens[rid][n:]
        elif op < 0.97:
            rid = rng.choice(live)
            mgr.free(rid)
            del tokens[rid]
        else:
            mgr.evict_all_cached()
        mgr.check_invariants()
        for rid, toks in tokens.items():
            assert mgr.num_tokens(rid) == len(toks)
    for rid in list(tokens):
        mgr.free(rid)
    mgr.check_invariants()
    mgr.evict_all_cached()
    assert mgr.num_free_blocks() == [39, 39]


def test_tables_are_persistent_arrays_fed_by_allocations():
    """A step reads each table as an int32 array and gets its slots vectorised; appends go
    into the same buffer (no per-step rebuild) and a COW swaps the tail entry in place."""
    import numpy as np

    mgr = manager(num_blocks=40, block_size=4)
    run(mgr, "a", list(range(6)))  # blocks 1, 2
    (table,) = mgr.block_table_arrays("a")
    assert table.dtype == np.int32 and table.tolist() == [1, 2]
    mgr.allocate_slots("a", 3)  # positions 6..8: block 3 appended
    (grown,) = mgr.block_table_arrays("a")
    assert grown.tolist() == [1, 2, 3] and np.shares_memory(table, grown)
    (slots,) = mgr.slot_arrays("a", 5, 9)
    assert slots.dtype == np.int32 and slots.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 3 * 4]
    mgr.fork("a", "b")
    alloc = mgr.allocate_slots("b", 1)  # b's partial tail is shared: COW 3 -> 4
    assert alloc.cow_copies == [[(3, 4)]] and mgr.block_table_arrays("b")[0].tolist() == [1, 2, 4]
    assert mgr.block_table_arrays("a")[0].tolist() == [1, 2, 3]
    mgr.allocate_slots("a", 4 * 20)  # past the initial capacity of 16 entries
    assert mgr.block_tables("a") == [[1, 2, 3, *range(5, 25)]]
    assert mgr.slot_mapping("a", 88, 90) == [[24 * 4 + 0, 24 * 4 + 1]]
    mgr.check_invariants()
