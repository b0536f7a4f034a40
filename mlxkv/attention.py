"""Paged attention over a flat batch: the pure-mx reference path (CPU path and kernel oracle).

Each sequence's keys are gathered through its block table (decoded by the layer's codec)
and masked by position: query at position p sees key j iff j <= p and, with a sliding
window W, j > p - W. Decode-only sequences are batched into one attention call (their
block tables are padded with the null block, which the mask hides); prefill chunks run
one sequence at a time. No token padding is ever added to the batch.

Decode rows can instead go through a `DecodeOp` (the fused kernels of mlxkv.kernels on
Metal, see `kernel_decode`; the compiled CPU primitive, see `cpu_decode`): it reads K/V
straight from the pools through the block tables, so no gathered copy of the context is
made. A decode op with a prefill twin (its `prefill` attribute, as the engine's KernelGuard
has, or `PREFILL_OPS`: the CPU primitive's `cpu_prefill`) also takes batches with prefill
chunks, all rows in one call; otherwise prefill chunks take the reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx

from mlxkv.codec.base import IDENTITY
from mlxkv.inputs import BatchInputs
from mlxkv.kernels import paged_attention_kernel, paged_attention_quant_kernel
from mlxkv.kernels._source import is_metal_available, run_metal
from mlxkv.kernels.paged_attention import is_kernel_supported as dense_supported
from mlxkv.kernels.paged_attention_cpu import cpu_decode, cpu_prefill, is_cpu_kernel_available
from mlxkv.kernels.paged_attention_quant import is_kernel_supported as quant_supported
from mlxkv.kernels.paged_attention_quant import pool_kv_heads
from mlxkv.kv_store import KVStore

# (q [B, H, D], store, layer_id, block_tables [B, MB], seq_lens [B], scale, window)
#   -> [B, H, D], or None when the op does not handle this layer (the reference runs).
DecodeOp = Callable[..., mx.array | None]
# A decode op's twin for batches with prefill chunks: (q [T, H, D], store, layer_id,
# block_tables [B, MB], batch, scale, window) -> [T, H, D] or None (the reference runs).
PREFILL_OPS = {cpu_decode: cpu_prefill}

# Verification chunks (every row sampled: speculative decoding) of at most this many
# rows run as decode rows through the fused decode op when it covers the layer.
MAX_VERIFY_ROWS = 16


def kernel_decode(q, store: KVStore, layer_id: int, tables, seq_lens, scale, window,
                  executor=run_metal):
    """Fused paged decode attention of one layer (full-precision or compressed pools).

    Returns None when the kernels do not cover the layer's codecs, dtype or head_dim.
    `executor` runs the launch plans: Metal, or the test emulator.
    """
    k_codec, v_codec = store.codecs[layer_id]
    k_pool, v_pool = store.k_pool(layer_id), store.v_pool(layer_id)
    kw = dict(queries=q, block_tables=tables, seq_lens=seq_lens, scale=scale,
              sliding_window=window, executor=executor)
    k_layout, v_layout = k_codec.kernel_layout, v_codec.kernel_layout
    if k_layout.kind == IDENTITY and v_layout.kind == IDENTITY:
        k_values = k_layout.component(k_pool, "values")
        if not dense_supported(q, k_values):
            return None
        return paged_attention_kernel(k_pool=k_values,
                                      v_pool=v_layout.component(v_pool, "values"), **kw)
    if not quant_supported(q, k_codec, v_codec, pool_kv_heads(k_pool)):
        return None
    return paged_attention_quant_kernel(k_pool=k_pool, v_pool=v_pool, k_codec=k_codec,
                                        v_codec=v_codec, **kw)


def default_decode_op(backend: str = "auto", verbose: bool = False) -> DecodeOp | None:
    """The fused decode op for "auto": `kernel_decode` on Metal, else `cpu_decode` when the
    compiled CPU extension loads; None (reference) for "reference" or when neither exists.

    `verbose` makes MLX print each kernel's generated Metal source (MLXKV_KERNEL_VERBOSE=1).
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"attention backend must be 'auto' or 'reference', got {backend!r}")
    if backend != "auto":
        return None
    if is_metal_available():
        if verbose:
            return partial(kernel_decode, executor=partial(run_metal, verbose=True))
        return kernel_decode
    return cpu_decode if is_cpu_kernel_available() else None


def gather_context(store: KVStore, layer_id: int, table: mx.array):
    """Decoded K, V [rows, num_kv_heads, L, head_dim] for block tables [rows, num_blocks]."""
    k, v = store.gather_blocks(layer_id, table)  # [rows, nb, bs, kvh, d]
    rows = table.shape[0]
    # Made contiguous here: MLX's CPU attention on the strided [rows, L, kvh, d] view is
    # several times slower than this one copy (benchmarks/paged_vs_dense.py).
    k = mx.contiguous(k.reshape(rows, -1, *k.shape[3:]).transpose(0, 2, 1, 3))
    v = mx.contiguous(v.reshape(rows, -1, *v.shape[3:]).transpose(0, 2, 1, 3))
    return k, v


def _mask(q_pos: mx.array, length: int, window: int | None) -> mx.array:
    """bool [..., Lq, L]: key j visible from query position p."""
    key_pos = mx.arange(length)
    p = q_pos[..., None]
    mask = key_pos <= p
    if window is not None:
        mask = mask & (key_pos > p - window)
    return mask


def _decode_batch(q, store, layer_id, table, positions, scale, window, memo=None,
                  decode_op=None):
    """q [B, H, D] one token per sequence -> [B, H, D]."""
    if decode_op is not None:
        out = decode_op(q, store, layer_id, table, positions + 1, scale, window)
        if out is not None:
            return out
    k, v = gather_context(store, layer_id, table)
    key = ("decode", k.shape[2], window, id(table))
    mask = None if memo is None else memo.get(key)
    if mask is None:
        mask = _mask(positions[:, None], k.shape[2], window)[:, None]  # [B, 1, 1, L]
        if memo is not None:
            memo[key] = mask
    out = mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, mask=mask)
    return out[:, :, 0]


def _prefill_one(q, store, layer_id, table_row, start, seq_len, scale, window):
    """q [Lq, H, D] of one sequence's chunk (positions start..seq_len-1) -> [Lq, H, D]."""
    k, v = gather_context(store, layer_id, table_row[None])
    k, v = k[:, :, :seq_len], v[:, :, :seq_len]
    q_pos = mx.arange(start, seq_len)
    mask = _mask(q_pos, seq_len, window)
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(1, 0, 2)[None], k, v, scale=scale, mask=mask
    )
    return out[0].transpose(1, 0, 2)


def paged_attention(
    q: mx.array,
    store: KVStore,
    layer_id: int,
    batch: BatchInputs,
    scale: float,
    sliding_window: int | None = None,
    decode_op: DecodeOp | None = None,
) -> mx.array:
    """Attention of the batch's queries q [T, H, D] over the paged store -> [T, H, D].

    The step's K/V must already be written (KVStore.write) at batch.slot_mapping. Decode
    rows use `decode_op` when given (and it covers the layer), the reference otherwise.
    """
    group = store.group_of_layer(layer_id)
    tables = batch.block_tables[group]
    if batch.is_decode_only:
        return _decode_batch(q, store, layer_id, tables, batch.positions, scale, sliding_window,
                             batch.memo, decode_op)
    prefill_op = getattr(decode_op, "prefill", None) or PREFILL_OPS.get(decode_op)
    if prefill_op is not None:
        out = prefill_op(q, store, layer_id, tables, batch, scale, sliding_window)
        if out is not None:
            return out
    starts = batch.query_start_loc
    outs: dict[int, mx.array] = {}
    decode_rows, verify_rows, chunks = [], [], {}
    for i in range(batch.num_seqs):
        q_len = starts[i + 1] - starts[i]
        if q_len == 1:
            decode_rows.append(i)
        elif decode_op is not None and q_len == batch.num_logits_list[i] <= MAX_VERIFY_ROWS:
            verify_rows.append(i)
        else:  # equal (length, start) chunks share one batched call
            chunks.setdefault((q_len, batch.start_positions[i]), []).append(i)
    verified = verify_rows and _verify_rows(q, store, layer_id, tables, batch, verify_rows,
                                            scale, sliding_window, decode_op)
    if verified:
        outs.update(verified)
    for i in verify_rows if not verified else ():  # the op declined: the prefill path
        chunks.setdefault((starts[i + 1] - starts[i], batch.start_positions[i]), []).append(i)
    if len(decode_rows) > 1 or (decode_rows and decode_op is not None):
        rows = mx.array(decode_rows, dtype=mx.int32)
        tok = mx.array([starts[i] for i in decode_rows], dtype=mx.int32)
        decoded = _decode_batch(q[tok], store, layer_id, tables[rows], batch.positions[tok],
                                scale, sliding_window, batch.memo, decode_op)
        outs.update({i: decoded[n][None] for n, i in enumerate(decode_rows)})
    elif decode_rows:
        chunks[(1, batch.start_positions[decode_rows[0]])] = decode_rows
    for (q_len, start), rows in chunks.items():
        out = _prefill_rows(q, store, layer_id, tables, batch, rows, q_len, start, scale,
                            sliding_window)
        outs.update({i: out[n] for n, i in enumerate(rows)})
    ordered = [outs[i] for i in range(batch.num_seqs)]
    return mx.concatenate(ordered, axis=0) if len(ordered) > 1 else ordered[0]


def _verify_rows(q, store, layer_id, tables, batch, seqs, scale, window, decode_op):
    """Verification chunks as decode rows -> {seq: [q_len, H, D]}, or None (op declined).

    Query row j of a sequence at position p is one decode row over the sequence's block
    table with p + j + 1 keys (its own and every earlier row's K/V are already written),
    so the fused decode op serves them without gathering the context.
    """
    starts = batch.query_start_loc
    tok = mx.array([t for i in seqs for t in range(starts[i], starts[i + 1])], dtype=mx.int32)
    owner = [i for i in seqs for _ in range(starts[i], starts[i + 1])]
    table = tables[mx.array(owner, dtype=mx.int32)]
    decoded = decode_op(q[tok], store, layer_id, table, batch.positions[tok] + 1, scale, window)
    if decoded is None:
        return None
    out, row = {}, 0
    for i in seqs:
        q_len = starts[i + 1] - starts[i]
        out[i] = decoded[row : row + q_len]
        row += q_len
    return out


def _prefill_rows(q, store, layer_id, tables, batch, rows, q_len, start, scale, window):
    """Chunks of equal length and start of several sequences -> list of [q_len, H, D]."""
    group = store.group_of_layer(layer_id)
    starts = batch.query_start_loc
    if len(rows) == 1:
        i = rows[0]
        nb = batch.num_blocks_list[group][i]
        return [_prefill_one(q[starts[i] : starts[i + 1]], store, layer_id, tables[i, :nb],
                             start, start + q_len, scale, window)]
    idx = mx.array([starts[i] + t for i in rows for t in range(q_len)], dtype=mx.int32)
    qs = q[idx].reshape(len(rows), q_len, *q.shape[1:]).transpose(0, 2, 1, 3)
    nb = max(batch.num_blocks_list[group][i] for i in rows)
    k, v = gather_context(store, layer_id, tables[mx.array(rows, dtype=mx.int32), :nb])
    k, v = k[:, :, : start + q_len], v[:, :, : start + q_len]
    mask = _mask(mx.arange(start, start + q_len), start + q_len, window)
    out = mx.fast.scaled_dot_product_attention(qs, k, v, scale=scale, mask=mask)
    return list(out.transpose(0, 2, 1, 3))
