"""Random paged-KV fixtures shared by the kernel tests (seeded numpy, exact block tables)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def make_case(*, seq_lens, num_kv_heads, gqa, head_dim, block_size, dtype=mx.float32,
              seed=0, spare_blocks=3):
    """Queries, pools and block tables with shuffled block ids (block 0 stays the null block).

    Tables are padded with block 0 past each sequence's blocks; every block of the pool that
    no table uses holds large garbage, so reading a wrong block shows up in the output.
    """
    rng = np.random.default_rng(seed)
    B = len(seq_lens)
    per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    max_blocks = max(per_seq) + 1
    num_blocks = sum(per_seq) + spare_blocks + 1
    ids = rng.permutation(np.arange(1, num_blocks))
    table = np.zeros((B, max_blocks), dtype=np.int32)
    pos = 0
    for b, nb in enumerate(per_seq):
        table[b, :nb] = ids[pos:pos + nb]
        pos += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    used = np.zeros(num_blocks, dtype=bool)
    used[table[table > 0]] = True
    k[~used] = 1e3  # poison: unused blocks dominate any softmax that touches them
    v[~used] = -1e3
    q = rng.standard_normal((B, num_kv_heads * gqa, head_dim)).astype(np.float32)
    return dict(queries=mx.array(q).astype(dtype), k_pool=mx.array(k).astype(dtype),
                v_pool=mx.array(v).astype(dtype), block_tables=mx.array(table),
                seq_lens=mx.array(np.array(seq_lens, dtype=np.int32)),
                scale=head_dim ** -0.5)


TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}


def max_err(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
