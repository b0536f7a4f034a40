"""Paged decode attention on the CPU: the compiled MLX primitive in mlxkv._ext (csrc/).

Triad: `paged_attention_cpu_kernel` / `paged_attention_quant_cpu_kernel` (the primitive:
reads the pools in place through the block tables, GQA groups share each K/V row, online
softmax, threads over (sequence, kv head, key split); affine, E8/D4 and Lloyd codes are
decoded inside the loop, rotated layouts in the rotated domain), the pure-mx twins `paged_attention_ref` / `paged_attention_quant_ref` (same
contract) and the `cpu_decode` DecodeOp. Which pools the primitive reads is decided from
each codec's `kernel_layout` alone. The extension is optional: `scripts/build_ext.sh`
builds it; without it (or when it fails its load-time smoke test) the CPU keeps the
reference path and one warning says so.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from types import ModuleType

import mlx.core as mx

from mlxkv.codec.base import AFFINE, D4, E8, IDENTITY, LLOYD, KernelLayout, KVCodec
from mlxkv.codec.rotation import rotation_matrix
from mlxkv.kernels.paged_attention import check_inputs, paged_attention_ref
from mlxkv.kv_store import KVStore

log = logging.getLogger(__name__)
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_API = ("paged_decode_attention", "paged_decode_attention_packed",
        "paged_prefill_attention_packed", "simd_level")


@cache
def _load_ext() -> ModuleType | None:
    """mlxkv._ext after a tiny call matches the reference; None (warned once) otherwise."""
    try:
        ext = importlib.import_module("mlxkv._ext")
        missing = [f for f in _API if not hasattr(ext, f)]
        if missing:
            raise RuntimeError(f"stale build without {', '.join(missing)}: rebuild it")
        q = mx.ones((1, 2, 4))
        pool = mx.arange(32, dtype=mx.float32).reshape(2, 2, 2, 4) / 32
        table, lens = mx.array([[1, 0]]), mx.array([3])
        got = ext.paged_decode_attention(q, pool, pool, table, lens, scale=0.5)
        want = paged_attention_ref(queries=q, k_pool=pool, v_pool=pool, block_tables=table,
                                   seq_lens=lens, scale=0.5)
        if not mx.allclose(got, want, atol=1e-5).item():
            raise RuntimeError("smoke test: primitive and reference disagree")
    except Exception as e:  # noqa: BLE001  (any failure means: use the reference)
        log.warning("mlxkv._ext unavailable (%s: %s); CPU attention uses the reference path"
                    "%s (build it with scripts/build_ext.sh)", type(e).__name__, e,
                    " and linear layers MLX's matmul" if isinstance(e, ImportError) else "")
        return None
    return ext


def is_cpu_kernel_available() -> bool:
    """True when the compiled extension imports and passes its smoke test."""
    return _load_ext() is not None


def _require_ext() -> ModuleType:
    ext = _load_ext()
    if ext is None:
        raise RuntimeError("mlxkv._ext is not available (scripts/build_ext.sh)")
    return ext


def paged_attention_cpu_kernel(*, queries, k_pool, v_pool, block_tables, seq_lens,
                               scale: float, sliding_window: int | None = None,
                               num_threads: int = 0, num_splits: int = 0) -> mx.array:
    """The primitive over full-precision pools -> [B, H, D] (contract of paged_attention.py).

    `num_threads` / `num_splits` 0 let the primitive choose (tests force them).

    Raises:
        RuntimeError: the extension is not available.
        ValueError: shapes or dtypes do not match the contract.
    """
    ext = _require_ext()
    check_inputs(queries, k_pool, v_pool, block_tables, seq_lens)
    if queries.dtype not in SUPPORTED_DTYPES or k_pool.dtype != queries.dtype:
        raise ValueError(f"float32/float16/bfloat16 pools matching the query dtype expected, "
                         f"got {queries.dtype}, {k_pool.dtype}")
    return ext.paged_decode_attention(queries, k_pool, v_pool, block_tables, seq_lens,
                                      scale=scale, sliding_window=sliding_window or 0,
                                      num_threads=num_threads, num_splits=num_splits)


def layout_supported(layout: KernelLayout, head_dim: int) -> bool:
    """True for layouts the primitive decodes in place: identity, affine (group 64, 4 or 8
    bits), E8/D4 box codes and Lloyd-Max levels at every rate the codecs write (2..8 bits:
    one little-endian word of `bits` bytes per 8 coordinates, uint64 above 4)."""
    if layout.kind == IDENTITY:
        return True
    if layout.kind == AFFINE:
        return layout.group_size == 64 and layout.bits in (4, 8) and head_dim % 64 == 0
    return layout.kind in (E8, D4, LLOYD) and 2 <= layout.bits <= 8 and head_dim % 8 == 0


def _decodable_layouts(k_codec: KVCodec, v_codec: KVCodec, head_dim: int):
    """The codecs' kernel layouts; ValueError when the primitive does not decode one."""
    kl, vl = k_codec.kernel_layout, v_codec.kernel_layout
    if not (layout_supported(kl, head_dim) and layout_supported(vl, head_dim)):
        raise ValueError(f"the CPU primitive does not decode {k_codec.name}/{v_codec.name} "
                         f"at head_dim {head_dim}")
    return kl, vl


def _components(layout: KernelLayout, pool) -> list[mx.array]:
    """The pool's components in the primitive's role order (+ Lloyd's levels)."""
    roles = {IDENTITY: ("values",), AFFINE: ("codes", "scales", "biases")}.get(
        layout.kind, ("codes", "scales"))
    comps = [layout.component(pool, role) for role in roles]
    if layout.kind == LLOYD:
        comps.append(_levels(layout.levels))
    return comps


@cache
def _levels(levels: tuple[float, ...]) -> mx.array:
    return mx.array(levels, dtype=mx.float32)


@cache
def _rotation(head_dim: int, seed: int) -> mx.array:
    return rotation_matrix(head_dim, seed)


def _packed_args(queries, k_layout, k_pool, v_layout, v_pool):
    """(positional layout arguments, rotation keywords) of the packed entry points."""
    D = queries.shape[-1]
    rot = {"k_rotation": _rotation(D, k_layout.rotation_seed) if k_layout.rotated else None,
           "v_rotation": _rotation(D, v_layout.rotation_seed) if v_layout.rotated else None}
    return (_components(k_layout, k_pool), k_layout.kind, k_layout.bits,
            _components(v_layout, v_pool), v_layout.kind, v_layout.bits), rot


def _packed_call(ext, queries, k_layout, k_pool, v_layout, v_pool, block_tables, seq_lens,
                 scale, sliding_window, **kw) -> mx.array:
    args, rot = _packed_args(queries, k_layout, k_pool, v_layout, v_pool)
    return ext.paged_decode_attention_packed(queries, *args, block_tables, seq_lens,
                                             scale=scale, sliding_window=sliding_window or 0,
                                             **rot, **kw)


def paged_prefill_cpu_kernel(*, queries, k_pool, v_pool, k_codec: KVCodec, v_codec: KVCodec,
                             block_tables, query_start, seq_lens, scale: float,
                             sliding_window: int | None = None,
                             num_threads: int = 0) -> mx.array:
    """Prefill chunks (and decode rows) over the cached prefix -> [T, H, D].

    queries [T, H, D]: sequence b's rows are query_start[b] .. query_start[b+1]-1, at
    positions seq_lens[b] - n_b .. seq_lens[b] - 1; each row sees the keys up to its own
    position (causal within the chunk) and, with a window W, the last W of them. Pools are
    component dicts in the codecs' layouts (identity pools: {"x": [NB, BS, KVH, D]}).

    Raises:
        RuntimeError: the extension is not available.
        ValueError: a layout the primitive does not decode, or bad shapes.
    """
    ext = _require_ext()
    kl, vl = _decodable_layouts(k_codec, v_codec, queries.shape[-1])
    args, rot = _packed_args(queries, kl, k_pool, vl, v_pool)
    return ext.paged_prefill_attention_packed(
        queries, *args, block_tables, query_start, seq_lens, scale=scale,
        sliding_window=sliding_window or 0, num_threads=num_threads, **rot)


def paged_attention_quant_cpu_kernel(*, queries, k_pool, v_pool, k_codec: KVCodec,
                                     v_codec: KVCodec, block_tables, seq_lens, scale: float,
                                     sliding_window: int | None = None, num_threads: int = 0,
                                     num_splits: int = 0) -> mx.array:
    """The primitive over compressed pools (component dicts) -> [B, H, D] in the query
    dtype; contract of `paged_attention_quant_ref`. Rotated layouts: the query is rotated
    once, V is accumulated in the rotated domain and the output un-rotated once.

    Raises:
        RuntimeError: the extension is not available.
        ValueError: a codec layout the primitive does not decode, or bad shapes.
    """
    ext = _require_ext()
    kl, vl = _decodable_layouts(k_codec, v_codec, queries.shape[-1])
    if queries.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"float queries expected, got {queries.dtype}")
    return _packed_call(ext, queries, kl, k_pool, vl, v_pool, block_tables, seq_lens, scale,
                        sliding_window, num_threads=num_threads, num_splits=num_splits)


@cache
def _layer_plan(k_layout: KernelLayout, v_layout: KernelLayout, head_dim: int) -> str | None:
    """'dense', 'packed' or None (reference) for a layer's pair of layouts."""
    if k_layout.kind == IDENTITY and v_layout.kind == IDENTITY:
        return "dense"
    if layout_supported(k_layout, head_dim) and layout_supported(v_layout, head_dim):
        return "packed"
    return None


def cpu_decode(q, store: KVStore, layer_id: int, tables, seq_lens, scale, window):
    """DecodeOp over the primitive; None when the extension or the layer's layouts are not
    covered (a layout kind or bit rate it does not decode), so the reference runs. Float
    pools may differ from the query dtype (fp16 pools under an fp32 model)."""
    ext = _load_ext()
    if ext is None or q.dtype not in SUPPORTED_DTYPES:
        return None
    k_codec, v_codec = store.codecs[layer_id]
    kl, vl = k_codec.kernel_layout, v_codec.kernel_layout
    plan = _layer_plan(kl, vl, q.shape[-1])
    k_pool, v_pool = store.k_pool(layer_id), store.v_pool(layer_id)
    if plan == "dense":
        k, v = kl.component(k_pool, "values"), vl.component(v_pool, "values")
        if k.dtype == q.dtype and v.dtype == q.dtype:
            return ext.paged_decode_attention(q, k, v, tables, seq_lens, scale=scale,
                                              sliding_window=window or 0)
        # fp16/bf16 pools under fp32 queries (`--kv-codec fp16` on the CPU): the packed
        # entry reads each pool in its own dtype
        return _packed_call(ext, q, kl, k_pool, vl, v_pool, tables, seq_lens, scale, window)
    if plan == "packed":
        return _packed_call(ext, q, kl, k_pool, vl, v_pool, tables, seq_lens, scale, window)
    return None


def cpu_prefill(q, store: KVStore, layer_id: int, tables, batch, scale, window):
    """The whole batch of one layer (prefill chunks and decode rows, q [T, H, D]) in one
    primitive call -> [T, H, D]; None (the reference runs) where cpu_decode would decline."""
    ext = _load_ext()
    if ext is None or q.dtype not in SUPPORTED_DTYPES:
        return None
    k_codec, v_codec = store.codecs[layer_id]
    kl, vl = k_codec.kernel_layout, v_codec.kernel_layout
    plan = _layer_plan(kl, vl, q.shape[-1])
    k_pool, v_pool = store.k_pool(layer_id), store.v_pool(layer_id)
    if plan is None:
        return None
    q_start = batch.memo.get("query_start")
    if q_start is None:
        q_start = batch.memo["query_start"] = mx.array(batch.query_start_loc, dtype=mx.int32)
    args, rot = _packed_args(q, kl, k_pool, vl, v_pool)
    return ext.paged_prefill_attention_packed(q, *args, tables, q_start, batch.seq_lens,
                                              scale=scale, sliding_window=window or 0, **rot)
