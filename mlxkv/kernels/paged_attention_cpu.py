"""Paged decode attention on the CPU: the compiled MLX primitive in mlxkv._ext (csrc/).

Triad: `paged_attention_cpu_kernel` (the primitive: reads the pools in place through the
block tables, GQA groups share each K/V row, online softmax, threads over (sequence, kv
head)), `paged_attention_ref` (the pure-mx twin in paged_attention.py, same contract) and
the `cpu_decode` DecodeOp. The extension is optional: `scripts/build_ext.sh` builds it;
without it (or when it fails its load-time smoke test) the CPU keeps the reference path
and one warning says so.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from types import ModuleType

import mlx.core as mx

from mlxkv.codec.identity import IdentityCodec
from mlxkv.kernels.paged_attention import check_inputs, paged_attention_ref
from mlxkv.kv_store import KVStore

log = logging.getLogger(__name__)
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@cache
def _load_ext() -> ModuleType | None:
    """mlxkv._ext after a tiny call matches the reference; None (warned once) otherwise."""
    try:
        ext = importlib.import_module("mlxkv._ext")
        q = mx.ones((1, 2, 4))
        pool = mx.arange(32, dtype=mx.float32).reshape(2, 2, 2, 4) / 32
        table, lens = mx.array([[1, 0]]), mx.array([3])
        got = ext.paged_decode_attention(q, pool, pool, table, lens, scale=0.5)
        want = paged_attention_ref(queries=q, k_pool=pool, v_pool=pool, block_tables=table,
                                   seq_lens=lens, scale=0.5)
        if not mx.allclose(got, want, atol=1e-5).item():
            raise RuntimeError("smoke test: primitive and reference disagree")
    except Exception as e:  # noqa: BLE001  (any failure means: use the reference)
        log.warning("mlxkv._ext unavailable (%s: %s); CPU attention uses the reference path "
                    "(build it with scripts/build_ext.sh)", type(e).__name__, e)
        return None
    return ext


def is_cpu_kernel_available() -> bool:
    """True when the compiled extension imports and passes its smoke test."""
    return _load_ext() is not None


def paged_attention_cpu_kernel(*, queries, k_pool, v_pool, block_tables, seq_lens,
                               scale: float, sliding_window: int | None = None,
                               num_threads: int = 0) -> mx.array:
    """The primitive -> [B, H, D] (contract of paged_attention.py's module docstring).

    Raises:
        RuntimeError: the extension is not available.
        ValueError: shapes or dtypes do not match the contract.
    """
    ext = _load_ext()
    if ext is None:
        raise RuntimeError("mlxkv._ext is not available (scripts/build_ext.sh)")
    check_inputs(queries, k_pool, v_pool, block_tables, seq_lens)
    if queries.dtype not in SUPPORTED_DTYPES or k_pool.dtype != queries.dtype:
        raise ValueError(f"float32/float16/bfloat16 pools matching the query dtype expected, "
                         f"got {queries.dtype}, {k_pool.dtype}")
    return ext.paged_decode_attention(queries, k_pool, v_pool, block_tables, seq_lens,
                                      scale=scale, sliding_window=sliding_window or 0,
                                      num_threads=num_threads)


def cpu_decode(q, store: KVStore, layer_id: int, tables, seq_lens, scale, window):
    """DecodeOp over the primitive; None when the extension or the layer is not covered
    (compressed codecs, dtype mismatch), so the reference runs."""
    k_codec, v_codec = store.codecs[layer_id]
    if not (isinstance(k_codec, IdentityCodec) and isinstance(v_codec, IdentityCodec)):
        return None
    k_pool, v_pool = store.k_pool(layer_id)["x"], store.v_pool(layer_id)["x"]
    if _load_ext() is None or q.dtype not in SUPPORTED_DTYPES or k_pool.dtype != q.dtype:
        return None
    return paged_attention_cpu_kernel(queries=q, k_pool=k_pool, v_pool=v_pool,
                                      block_tables=tables, seq_lens=seq_lens, scale=scale,
                                      sliding_window=window)
