"""Planted data-plane bugs: each mutant patches one function (through pytest's monkeypatch)
so that attention reads or writes the wrong K/V while every control-plane invariant holds.

A mutant is `plant(monkeypatch)`; tests/mutation/test_mutants.py runs the oracles named
in KILLERS under each one and requires that they fail.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxkv import attention, inputs
from mlxkv.cache_manager import KVCacheManager
from mlxkv.kv_store import KVStore
from mlxkv.prefix import PrefixIndex


def mask_hides_previous_key(mp):
    """Causal mask off by one: each query misses the key just before it."""
    orig = attention._mask

    def mask(q_pos, length, window):
        return orig(q_pos, length, window) & (mx.arange(length) != q_pos[..., None] - 1)

    mp.setattr(attention, "_mask", mask)


def mask_hides_own_key(mp):
    """Causal mask off by one the other way: `j < p` instead of `j <= p`."""
    orig = attention._mask

    def mask(q_pos, length, window):
        return orig(q_pos, length, window) & (mx.arange(length) != q_pos[..., None])

    mp.setattr(attention, "_mask", mask)


def window_one_too_wide(mp):
    """Sliding window off by one: a query also sees the key W positions back."""
    orig = attention._mask

    def mask(q_pos, length, window):
        return orig(q_pos, length, None if window is None else window + 1)

    mp.setattr(attention, "_mask", mask)


def prefix_hit_neighbour_block(mp):
    """A cache hit returns the block of the previous hit in the chain (refcounts intact)."""
    orig = PrefixIndex.get
    last: dict[int, int] = {}

    def get(self, block_hash, token_ids):
        block = orig(self, block_hash, token_ids)
        prev = last.get(id(self))
        if block is not None:
            last[id(self)] = block
        return prev if block is not None and prev is not None else block

    mp.setattr(PrefixIndex, "get", get)


def stale_slot_mapping(mp):
    """Decode steps reuse the slots of the request's previous decode step."""
    orig = KVCacheManager.slot_arrays
    seen: dict[tuple[int, str], list] = {}

    def slot_arrays(self, request_id, start, end):
        slots = orig(self, request_id, start, end)
        if end - start != 1:
            return slots
        return seen.setdefault((id(self), request_id), slots)

    mp.setattr(KVCacheManager, "slot_arrays", slot_arrays)


def slot_off_by_one(mp):
    """Every token's K/V lands in the slot after its own (within the block table)."""
    orig = KVCacheManager.slot_arrays

    def slot_arrays(self, request_id, start, end):
        tables = self._seqs[request_id].tables
        bs = self.block_size
        out = orig(self, request_id, start, end)
        return [np.array([t[(p + 1) // bs] * bs + (p + 1) % bs if (p + 1) // bs < len(t) else s
                          for p, s in zip(range(start, end), slots.tolist(), strict=True)],
                         dtype=np.int32)
                for t, slots in zip(tables, out, strict=True)]

    mp.setattr(KVCacheManager, "slot_arrays", slot_arrays)


def cow_shares_instead_of_copies(mp):
    """A shared partial tail is written in place instead of copied (forks corrupt each other)."""

    def prepare_tail(self, g, table, copies):
        tail = table[-1]
        if g.pool.ref_count[tail] == 1 and g.pool.block_hash[tail] is not None:
            g.index.forget(g.pool.block_hash[tail], tail)
            g.pool.clear_hash(tail)

    mp.setattr(KVCacheManager, "_prepare_tail", prepare_tail)


def cow_copy_skipped(mp):
    """The COW block is allocated but the store never copies the data into it."""
    mp.setattr(KVStore, "copy_blocks", lambda self, group_id, pairs: None)


def trim_keeps_tail(mp):
    """Trim to a position inside a block keeps counting that block's stale tail tokens."""
    orig = KVCacheManager.trim

    def trim(self, request_id, num_tokens):
        orig(self, request_id, num_tokens)
        seq = self._seqs[request_id]
        seq.num_tokens = len(seq.tables[0]) * self.block_size

    mp.setattr(KVCacheManager, "trim", trim)


def decode_rows_swapped(mp):
    """Batched decode reads each row's context through the next row's block table."""
    orig = attention._decode_batch

    def decode(q, store, layer_id, table, positions, *args, **kw):
        if table.shape[0] > 1:
            table = mx.concatenate([table[1:], table[:1]])
            positions = mx.concatenate([positions[1:], positions[:1]])
        return orig(q, store, layer_id, table, positions, *args, **kw)

    mp.setattr(attention, "_decode_batch", decode)


def chunk_positions_shifted(mp):
    """Tokens of a prefill chunk after the first get positions (RoPE offsets) one too high."""
    orig = inputs.build_batch

    def build_batch(entries):
        batch = orig(entries)
        shift = [int(e.start_pos > 0 and len(e.token_ids) > 1)
                 for e in entries for _ in e.token_ids]
        batch.positions = batch.positions + mx.array(shift, dtype=mx.int32)
        return batch

    for module in ("mlxkv.engine", "mlxkv.inputs"):
        mp.setattr(f"{module}.build_batch", build_batch)


def compressed_scales_from_next_slot(mp):
    """Compressed pools: codes are read from their slot, scales from the next slot."""
    orig = KVStore.gather_blocks

    def gather_blocks(self, layer_id, block_ids):
        out = []
        for pools, codec in zip(self._pools[layer_id], self.codecs[layer_id], strict=True):
            packed = {}
            for i, (name, pool) in enumerate(pools.items()):
                blocks = pool[block_ids]
                packed[name] = mx.roll(blocks, 1, axis=-3) if i else blocks
            out.append(codec.decode(packed, self.dtype))
        return out[0], out[1]

    assert orig is not None
    mp.setattr(KVStore, "gather_blocks", gather_blocks)


# mutant -> (architecture, oracles of which at least the first must fail)
KILLERS = {
    mask_hides_previous_key: ("llama", ["engine_vs_mlx_lm"]),
    mask_hides_own_key: ("qwen3", ["engine_vs_mlx_lm"]),
    window_one_too_wide: ("gemma3_text", ["engine_vs_mlx_lm"]),
    prefix_hit_neighbour_block: ("llama", ["prefix_hit_vs_cold"]),
    stale_slot_mapping: ("qwen2", ["engine_vs_mlx_lm"]),
    slot_off_by_one: ("mistral", ["engine_vs_mlx_lm"]),
    cow_shares_instead_of_copies: ("llama", ["fork_vs_fresh"]),
    cow_copy_skipped: ("gemma2", ["fork_vs_fresh"]),
    trim_keeps_tail: ("llama", ["trim_vs_never_written"]),
    decode_rows_swapped: ("qwen3", ["mixed_batch_vs_alone"]),
    chunk_positions_shifted: ("llama", ["chunked_vs_whole"]),
}
