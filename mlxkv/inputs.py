"""build_batch: one engine step's sequences -> flat, unpadded model inputs (mx.int32).

    seq 0: prefill chunk of 3 new tokens at positions 5..7     seq 1: decode 1 token at 12
    input_ids      [ a5 a6 a7 | b12 ]          query_start_loc [0, 3, 4]
    positions      [  5  6  7 |  12 ]          seq_lens        [8, 13]  (context after step)
    slot_mapping[g][ s  s  s  |  s  ]          logits_indices  [2, 3]   (last token of samplers)
A speculating sequence samples its last `num_logits` tokens (1 + its drafts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


@dataclass(slots=True)
class SeqEntry:
    """One sequence's share of a step (built by the engine from the cache manager)."""

    token_ids: Sequence[int]  # the new tokens computed this step
    start_pos: int  # position of token_ids[0]
    slot_mapping: Sequence[Sequence[int]]  # per group, one slot per new token (list or array)
    block_tables: Sequence[Sequence[int]]  # per group, block ids covering the context
    sample: bool = True  # whether the last token's logits are needed
    num_logits: int = 1  # when sampling, logits of this many last tokens (speculative rows)


@dataclass(slots=True)
class BatchInputs:
    """Flat inputs of one forward. Python lists mirror the arrays for host-side loops."""

    input_ids: mx.array  # [T]
    positions: mx.array  # [T]
    slot_mapping: list[mx.array]  # per group [T]
    block_tables: list[mx.array]  # per group [B, max_blocks]
    seq_lens: mx.array  # [B]
    logits_indices: mx.array  # [S]
    query_start_loc: list[int]  # B + 1
    seq_lens_list: list[int]
    start_positions: list[int]
    num_blocks_list: list[list[int]]  # per group, per seq: table length
    num_logits_list: list[int]  # per seq: rows whose logits are returned (0: none)
    memo: dict = field(default_factory=dict)  # per-forward values shared by layers (masks)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs


def _pad_tables(tables: list[Sequence[int]]) -> mx.array:
    width = max(1, max(len(t) for t in tables))
    padded = np.zeros((len(tables), width), dtype=np.int32)
    for row, table in zip(padded, tables, strict=True):
        row[: len(table)] = table
    return mx.array(padded)


def build_batch(entries: Sequence[SeqEntry]) -> BatchInputs:
    """Concatenate the entries' tokens; pad only the block tables (with the null block)."""
    if not entries:
        raise ValueError("build_batch needs at least one sequence")
    num_groups = len(entries[0].block_tables)
    ids, positions, starts, lens, logits_idx = [], [], [0], [], []
    slots: list[list] = [[] for _ in range(num_groups)]
    for e in entries:
        n = len(e.token_ids)
        ids.extend(e.token_ids)
        positions.extend(range(e.start_pos, e.start_pos + n))
        for g in range(num_groups):
            slots[g].append(np.asarray(e.slot_mapping[g], dtype=np.int32))
        starts.append(starts[-1] + n)
        lens.append(e.start_pos + n)
        if e.sample:
            logits_idx.extend(range(starts[-1] - e.num_logits, starts[-1]))
    return BatchInputs(
        input_ids=mx.array(ids, dtype=mx.int32),
        positions=mx.array(positions, dtype=mx.int32),
        slot_mapping=[mx.array(np.concatenate(s)) for s in slots],
        block_tables=[_pad_tables([e.block_tables[g] for e in entries]) for g in range(num_groups)],
        seq_lens=mx.array(lens, dtype=mx.int32),
        logits_indices=mx.array(logits_idx, dtype=mx.int32),
        query_start_loc=starts,
        seq_lens_list=lens,
        start_positions=[e.start_pos for e in entries],
        num_blocks_list=[[len(e.block_tables[g]) for e in entries] for g in range(num_groups)],
        num_logits_list=[e.num_logits if e.sample else 0 for e in entries],
    )
