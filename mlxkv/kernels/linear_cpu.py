"""Small-M linear on the CPU: the compiled MLX primitive `small_m_linear` in mlxkv._ext.

Triad: `linear_cpu_kernel` (the primitive: `x @ weight.T (+ bias)` for fp32 x [..., K]
with few rows, weight [N, K] read once per call, AVX2+FMA register tiles, W's rows split
over a persistent worker pool), its pure-mx twin `linear_ref` (what `nn.Linear` computes)
and the dispatcher `small_m_linear` (the primitive when the extension loads, the rows
are at most `max_rows` and everything is float32; else the reference). Decode's matmuls
have 1..16 rows (more with speculative verify rows), where MLX's call into OpenBLAS's sgemm is several times slower than
streaming the weight once; prefill keeps sgemm (`MAX_ROWS`, measured in docs/kernels.md).
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from types import ModuleType

import mlx.core as mx

log = logging.getLogger(__name__)

# Most rows of x the dispatcher sends to the primitive: it beats MLX's sgemm on every
# SmolLM2 shape up to 24 rows measured, and is even or slower from 32
# (benchmarks/bench_linear.py; docs/kernels.md "small_m_linear").
MAX_ROWS = 24


def linear_ref(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """`x @ weight.T (+ bias)` with MLX's matmul (exactly what nn.Linear computes)."""
    if bias is None:
        return x @ weight.T
    return mx.addmm(bias, x, weight.T)


@cache
def _load_ext() -> ModuleType | None:
    """mlxkv._ext when its `small_m_linear` matches the reference on a tiny case; None
    (warned once) otherwise."""
    try:
        ext = importlib.import_module("mlxkv._ext")
    except ImportError as e:  # no extension at all: the attention loader's one warning says so
        log.debug("mlxkv._ext not importable (%s); linear layers keep MLX's matmul", e)
        return None
    try:
        if not hasattr(ext, "small_m_linear"):
            raise RuntimeError("stale build without small_m_linear: rebuild it")
        x = mx.arange(30, dtype=mx.float32).reshape(3, 10) / 7
        w = mx.cos(mx.arange(130, dtype=mx.float32)).reshape(13, 10)
        b = mx.arange(13, dtype=mx.float32)
        if not mx.allclose(ext.small_m_linear(x, w, b), linear_ref(x, w, b), atol=1e-5).item():
            raise RuntimeError("smoke test: primitive and reference disagree")
    except Exception as e:  # noqa: BLE001  (any failure means: use the reference)
        log.warning("mlxkv._ext unavailable for linear layers (%s: %s); they keep MLX's "
                    "matmul (build it with scripts/build_ext.sh)", type(e).__name__, e)
        return None
    return ext


def is_linear_kernel_available() -> bool:
    """True when the compiled extension imports and its linear passes the smoke test."""
    return _load_ext() is not None


def linear_primitive():
    """The extension's `small_m_linear(x, weight, bias)` (no Python checks: it validates
    itself, ValueError), or None when the extension is not available."""
    ext = _load_ext()
    return None if ext is None else ext.small_m_linear


def linear_cpu_kernel(x: mx.array, weight: mx.array, bias: mx.array | None = None, *,
                      num_threads: int = 0) -> mx.array:
    """The primitive: fp32 x [..., K], weight [N, K], bias [N] -> [..., N] (CPU stream).

    Any row count works; `num_threads` 0 lets the pool decide (tests force it). Strided
    inputs are packed inside the call (a full copy for a strided weight).

    Raises:
        RuntimeError: the extension is not available.
        ValueError: shapes or dtypes outside the contract.
    """
    ext = _load_ext()
    if ext is None:
        raise RuntimeError("mlxkv._ext is not available (scripts/build_ext.sh)")
    return ext.small_m_linear(x, weight, bias, num_threads=num_threads)


def kernel_applies(x: mx.array, weight: mx.array, bias: mx.array | None,
                   max_rows: int = MAX_ROWS) -> bool:
    """True when `small_m_linear` would run the primitive on these arguments."""
    return (x.dtype == mx.float32 and weight.dtype == mx.float32 and weight.ndim == 2
            and (bias is None or bias.dtype == mx.float32)
            and x.size <= max_rows * weight.shape[1] and x.shape[-1] == weight.shape[1]
            and mx.default_device() == mx.cpu and is_linear_kernel_available())


def small_m_linear(x: mx.array, weight: mx.array, bias: mx.array | None = None, *,
                   max_rows: int = MAX_ROWS) -> mx.array:
    """Dispatcher: the primitive for few fp32 rows on the CPU, else `linear_ref`."""
    if kernel_applies(x, weight, bias, max_rows):
        return linear_cpu_kernel(x, weight, bias)
    return linear_ref(x, weight, bias)
