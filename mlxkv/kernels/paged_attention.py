"""Paged decode attention over full-precision K/V pools (no gather copy), GQA, windows, split-K.

Triad: `paged_attention_kernel` (metal/paged_attention.metal + the split combine),
`paged_attention_ref` (pure mx) and the `paged_attention` dispatcher (kernel when Metal is
available and the shape is supported, else the reference).

    queries      [B, H, D]            one decode query per sequence, H = KVH * G
    k_pool/v_pool[NB, BS, KVH, D]     the KVStore pools of one layer (identity codec)
    block_tables [B, MB] int32        block ids; entries past a sequence's length are ignored
    seq_lens     [B] int32            keys 0..L-1 are visible (the query sits at position L-1)
    sliding_window W                  only keys j >= L - W are visible
    -> [B, H, D] in the query dtype; a sequence with L = 0 yields zeros.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mlxkv.kernels._source import (
    KernelLaunch,
    is_metal_available,
    log_fallback_once,
    make_spec,
    run_metal,
)
from mlxkv.kernels.paged_attention_combine import paged_attention_combine_kernel

Executor = Callable[[KernelLaunch], list[mx.array]]
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_TG_FLOATS = 4096  # threadgroup floats for the simdgroup merge (16 KiB of Metal's 32 KiB)
TG_LIMIT_BYTES = 32768  # Metal's threadgroup memory per threadgroup


def threadgroup_bytes(gqa: int, head_dim: int, nsg: int, rotated_query: bool = False) -> int:
    """Threadgroup memory of one attention threadgroup: tg_m, tg_l, tg_acc (+ tg_q)."""
    floats = nsg * gqa * (head_dim + 2) + (gqa * head_dim if rotated_query else 0)
    return 4 * floats


def fits_threadgroup(gqa: int, head_dim: int) -> bool:
    """True when one threadgroup's merge buffers fit Metal's 32 KiB."""
    return threadgroup_bytes(gqa, head_dim, simdgroups_for(gqa, head_dim)) <= TG_LIMIT_BYTES


def _spec():
    return make_spec("mlxkv_paged_attention",
                     ("queries", "k_pool", "v_pool", "block_tables", "seq_lens", "params",
                      "scale"), ("o_part", "lse_part"), "paged_attention.metal")


def check_tables(queries: mx.array, num_kv_heads: int, block_tables: mx.array,
                 seq_lens: mx.array) -> int:
    """Validate queries/tables against the pool's kv heads; return the GQA ratio G."""
    if queries.ndim != 3 or queries.shape[1] % num_kv_heads:
        raise ValueError(f"queries [B, H, D] with H a multiple of {num_kv_heads} expected, "
                         f"got {queries.shape}")
    B = queries.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables [B,MB] and seq_lens [B] expected, got "
                         f"{block_tables.shape}, {seq_lens.shape}")
    if block_tables.dtype != mx.int32 or seq_lens.dtype != mx.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    return queries.shape[1] // num_kv_heads


def check_inputs(queries: mx.array, k_pool: mx.array, v_pool: mx.array,
                 block_tables: mx.array, seq_lens: mx.array) -> tuple[int, int]:
    """Validate ranks/dtypes of full-precision pools; return (num_kv_heads, G). ValueError."""
    if k_pool.ndim != 4 or v_pool.shape != k_pool.shape or k_pool.shape[3] != queries.shape[-1]:
        raise ValueError(f"pools [NB,BS,KVH,D] matching queries [B,H,D] expected, got "
                         f"{queries.shape}, {k_pool.shape}, {v_pool.shape}")
    return k_pool.shape[2], check_tables(queries, k_pool.shape[2], block_tables, seq_lens)


def default_num_splits(max_context: int) -> int:
    """Split-K factor from the table capacity (no device sync): one split per 512 keys, <= 16."""
    return max(1, min(16, -(-max_context // 512)))


def simdgroups_for(gqa: int, head_dim: int) -> int:
    """Simdgroups per threadgroup so the merge buffer stays within _TG_FLOATS."""
    return max(1, min(4, _TG_FLOATS // (gqa * head_dim)))


def plan_paged_attention(*, queries, k_pool, v_pool, block_tables, seq_lens, scale: float,
                         sliding_window: int | None = None,
                         num_splits: int | None = None) -> KernelLaunch:
    """Launch plan of the attention pass (outputs o_part [B,S,H,D], lse_part [B,S,H])."""
    kvh, gqa = check_inputs(queries, k_pool, v_pool, block_tables, seq_lens)
    B, H, D = queries.shape
    BS, MB = k_pool.shape[1], block_tables.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"paged_attention_kernel supports head_dim {SUPPORTED_HEAD_DIMS}")
    splits = num_splits or default_num_splits(MB * BS)
    nsg = simdgroups_for(gqa, D)
    if not fits_threadgroup(gqa, D):
        raise ValueError(f"GQA {gqa} x head_dim {D} needs more than 32 KiB of threadgroup memory")
    params = mx.array([MB, sliding_window or 0, splits, 0], dtype=mx.int32)
    return KernelLaunch(
        spec=_spec(),
        inputs=[queries, k_pool, v_pool.astype(k_pool.dtype), block_tables, seq_lens, params,
                mx.array([scale], dtype=mx.float32)],
        template=[("T", queries.dtype), ("D", D), ("BS", BS), ("KVH", kvh), ("G", gqa),
                  ("NSG", nsg)],
        grid=(32 * nsg, kvh, B * splits), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(B, splits, H, D), (B, splits, H)],
        output_dtypes=[mx.float32, mx.float32])


def paged_attention_kernel(*, queries, k_pool, v_pool, block_tables, seq_lens, scale: float,
                           sliding_window: int | None = None, num_splits: int | None = None,
                           executor: Executor = run_metal) -> mx.array:
    """Kernel path -> [B, H, D]; `executor` runs each plan (Metal, or the test emulator)."""
    if k_pool.dtype != queries.dtype:
        raise ValueError(f"pool dtype {k_pool.dtype} != query dtype {queries.dtype}")
    launch = plan_paged_attention(queries=queries, k_pool=k_pool, v_pool=v_pool,
                                  block_tables=block_tables, seq_lens=seq_lens, scale=scale,
                                  sliding_window=sliding_window, num_splits=num_splits)
    o_part, lse_part = executor(launch)
    if o_part.shape[1] == 1:
        return o_part[:, 0].astype(queries.dtype)
    return paged_attention_combine_kernel(o_part=o_part, lse_part=lse_part,
                                          dtype=queries.dtype, executor=executor)


def visible_mask(seq_lens: mx.array, length: int, sliding_window: int | None) -> mx.array:
    """bool [B, length]: key j visible to the decode query of a sequence of length L."""
    pos = mx.arange(length)[None]
    lens = seq_lens[:, None]
    mask = pos < lens
    if sliding_window:
        mask = mask & (pos >= lens - sliding_window)
    return mask


def attend_ref(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
    """fp32 masked attention: q [B,KVH,G,D] (pre-scaled), k/v [B,KVH,L,D], mask [B,L]."""
    s = q @ k.transpose(0, 1, 3, 2)  # [B, KVH, G, L]
    s = mx.where(mask[:, None, None, :], s, -mx.inf)
    m = mx.max(s, axis=-1, keepdims=True)
    p = mx.where(mask[:, None, None, :], mx.exp(s - mx.where(m > -mx.inf, m, 0.0)), 0.0)
    total = mx.sum(p, axis=-1, keepdims=True)
    out = (p @ v) / mx.maximum(total, 1e-30)
    return mx.where(total > 0, out, 0.0)


def paged_attention_ref(*, queries, k_pool, v_pool, block_tables, seq_lens, scale: float,
                        sliding_window: int | None = None,
                        num_splits: int | None = None) -> mx.array:
    """Pure-mx twin (gathers through the block tables; num_splits does not change the math)."""
    kvh, gqa = check_inputs(queries, k_pool, v_pool, block_tables, seq_lens)
    B, H, D = queries.shape
    BS, MB = k_pool.shape[1], block_tables.shape[1]

    def gather(pool):  # [B, KVH, MB * BS, D] fp32
        return pool[block_tables].reshape(B, MB * BS, kvh, D).transpose(0, 2, 1, 3).astype(
            mx.float32)

    q = queries.astype(mx.float32).reshape(B, kvh, gqa, D) * scale
    out = attend_ref(q, gather(k_pool), gather(v_pool),
                     visible_mask(seq_lens, MB * BS, sliding_window))
    return out.reshape(B, H, D).astype(queries.dtype)


def is_kernel_supported(queries: mx.array, k_pool: mx.array) -> bool:
    """True when the Metal kernel handles this dtype/head_dim/GQA combination."""
    D = queries.shape[-1]
    gqa = queries.shape[1] // max(1, k_pool.shape[2])
    return (D in SUPPORTED_HEAD_DIMS and k_pool.dtype == queries.dtype
            and queries.dtype in (mx.float32, mx.float16, mx.bfloat16)
            and fits_threadgroup(gqa, D))


def paged_attention(*, queries, k_pool, v_pool, block_tables, seq_lens, scale: float,
                    sliding_window: int | None = None,
                    num_splits: int | None = None) -> mx.array:
    """Dispatcher: Metal kernel when available and supported, else `paged_attention_ref`."""
    kwargs = dict(queries=queries, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
                  seq_lens=seq_lens, scale=scale, sliding_window=sliding_window,
                  num_splits=num_splits)
    if is_metal_available() and is_kernel_supported(queries, k_pool):
        return paged_attention_kernel(**kwargs)
    log_fallback_once("paged_attention", "no Metal device or unsupported shape")
    return paged_attention_ref(**kwargs)
