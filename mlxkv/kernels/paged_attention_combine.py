"""Split-K combine for paged attention: merge per-split (output, log-sum-exp) partials.

Triad: `paged_attention_combine_kernel` (metal/paged_attention_combine.metal),
`paged_attention_combine_ref` (pure mx) and the `paged_attention_combine` dispatcher.
With `signs` it also applies R^T = diag(signs) H / sqrt(D) (the un-rotation of
rotated-domain codecs) once per output vector.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mlxkv.kernels._hadamard import hadamard_unnormalised
from mlxkv.kernels._source import (
    KernelLaunch,
    is_metal_available,
    log_fallback_once,
    make_spec,
    run_metal,
)

Executor = Callable[[KernelLaunch], list[mx.array]]


def _spec():
    return make_spec("mlxkv_paged_attention_combine", ("o_part", "lse_part", "signs"), ("out",),
                     "paged_attention_combine.metal")


def _check(o_part: mx.array, lse_part: mx.array, signs: mx.array | None) -> None:
    if o_part.ndim != 4 or lse_part.shape != o_part.shape[:3]:
        raise ValueError(f"o_part [B,S,H,D] / lse_part [B,S,H] mismatch: {o_part.shape} "
                         f"{lse_part.shape}")
    if signs is not None and signs.shape != (o_part.shape[3],):
        raise ValueError(f"signs must be [D], got {signs.shape}")


def plan_paged_attention_combine(*, o_part: mx.array, lse_part: mx.array, dtype: mx.Dtype,
                                 signs: mx.array | None = None) -> KernelLaunch:
    """Launch plan: grid (D, H, B), one threadgroup of D threads per (sequence, head)."""
    _check(o_part, lse_part, signs)
    B, S, H, D = o_part.shape
    unrot = signs is not None
    sign_arr = signs.astype(mx.float32) if unrot else mx.ones((D,), dtype=mx.float32)
    return KernelLaunch(
        spec=_spec(),
        inputs=[o_part.astype(mx.float32), lse_part.astype(mx.float32), sign_arr],
        template=[("T", dtype), ("D", D), ("S", S), ("UNROT", unrot)],
        grid=(D, H, B), threadgroup=(D, 1, 1),
        output_shapes=[(B, H, D)], output_dtypes=[dtype])


def paged_attention_combine_kernel(*, o_part: mx.array, lse_part: mx.array, dtype: mx.Dtype,
                                   signs: mx.array | None = None,
                                   executor: Executor = run_metal) -> mx.array:
    """Metal path -> [B, H, D] in `dtype` (`executor` runs the plan: Metal or the emulator)."""
    launch = plan_paged_attention_combine(o_part=o_part, lse_part=lse_part, dtype=dtype,
                                          signs=signs)
    return executor(launch)[0]


def paged_attention_combine_ref(*, o_part: mx.array, lse_part: mx.array, dtype: mx.Dtype,
                                signs: mx.array | None = None) -> mx.array:
    """Pure-mx twin: same inputs, same output (0 for sequences that saw no key)."""
    _check(o_part, lse_part, signs)
    m = mx.max(lse_part, axis=1, keepdims=True)  # [B, 1, H]
    finite = m > -mx.inf
    w = mx.where(finite, mx.exp(lse_part - mx.where(finite, m, 0.0)), 0.0)  # [B, S, H]
    total = mx.sum(w, axis=1)  # [B, H]
    out = mx.sum(w[..., None] * o_part, axis=1) / mx.maximum(total, 1e-30)[..., None]
    out = mx.where((total > 0)[..., None], out, 0.0)
    if signs is not None:
        D = out.shape[-1]
        out = hadamard_unnormalised(out) * signs.astype(mx.float32) / (D**0.5)
    return out.astype(dtype)


def paged_attention_combine(*, o_part: mx.array, lse_part: mx.array, dtype: mx.Dtype,
                            signs: mx.array | None = None) -> mx.array:
    """Dispatcher: the Metal kernel when available, else the reference."""
    if is_metal_available():
        return paged_attention_combine_kernel(o_part=o_part, lse_part=lse_part, dtype=dtype,
                                              signs=signs)
    log_fallback_once("paged_attention_combine", "no Metal device")
    return paged_attention_combine_ref(o_part=o_part, lse_part=lse_part, dtype=dtype,
                                       signs=signs)
