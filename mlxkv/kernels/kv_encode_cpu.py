"""KV write path on the CPU: the compiled encode primitive in mlxkv._ext (csrc/encode.cpp).

Triad: `kv_encode_cpu_kernel` (the primitive: RMS scale, exact E8/D4 nearest point or
Lloyd-Max level, packing, after the same MLX rotation matmul the codec runs), the pure-mx
twin `kv_encode_ref` (= codec.encode, the oracle) and the dispatcher `cpu_write`, a
PoolWriter: it encodes a layer's new K or V rows straight into the pool at their slots
(`kv_write_cpu_kernel`, one lazy graph node per pool pair, in place when MLX may donate the
pools) and declines (None) what it does not cover, so the store encodes and scatters with
its encoder. Codes and scales are bit-identical to `codec.encode` (the tests hold them to
it over a grid); which layouts are covered is decided from `kernel_layout` alone.
"""

from __future__ import annotations

import logging
from functools import cache
from types import ModuleType

import mlx.core as mx

from mlxkv.codec.base import D4, E8, LLOYD, KernelLayout, KVCodec
from mlxkv.codec.rotation import rotation_matrix
from mlxkv.kernels.kv_encode import kv_encode_ref
from mlxkv.kernels.paged_attention_cpu import _load_ext

log = logging.getLogger(__name__)
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_API = ("kv_encode", "kv_encode_write")


def encode_layout_supported(layout: KernelLayout, head_dim: int) -> bool:
    """True for rotated E8/D4 lattice and Lloyd-Max layouts at 2..8 bits, head_dim a power
    of two >= 8 (the rotation's requirement)."""
    return (layout.kind in (E8, D4, LLOYD) and layout.rotated and 2 <= layout.bits <= 8
            and head_dim >= 8 and head_dim & (head_dim - 1) == 0)


def is_write_supported(x: mx.array, codec: KVCodec) -> bool:
    """True when the primitive encodes `codec` for float rows x [..., D]."""
    return x.dtype in FLOAT_DTYPES and _plan(codec.kernel_layout, x.shape[-1]) is not None


@cache
def _mids(levels: tuple[float, ...]) -> mx.array:
    """Decision thresholds between the Lloyd levels, computed as LloydCodec.encode does."""
    lv = mx.array(levels, dtype=mx.float32)
    mids = (lv[1:] + lv[:-1]) / 2
    mx.eval(mids)
    return mids


@cache
def _plan(layout: KernelLayout, head_dim: int) -> tuple[mx.array, dict, tuple[str, str]] | None:
    """(rotation R, keyword arguments of the ext's entry points, (codes, scales) component
    names) for a covered layout, else None. Cached: a write runs per layer and step."""
    if not encode_layout_supported(layout, head_dim):
        return None
    rotation = rotation_matrix(head_dim, layout.rotation_seed)
    mx.eval(rotation)
    kw = {"kind": layout.kind, "bits": layout.bits,
          "step": layout.step if layout.kind != LLOYD else 1.0,
          "mids": _mids(layout.levels) if layout.kind == LLOYD else None}
    return rotation, kw, (layout.roles["codes"], layout.roles["scales"])


@cache
def _load_encode_ext() -> ModuleType | None:
    """mlxkv._ext when it has the encode entry points and they reproduce codec.encode bit
    for bit on a small case (this also checks the assumptions the C++ makes about MLX's
    CPU arithmetic: BLAS, reduction order, powf); None (warned once) otherwise."""
    ext = _load_ext()
    if ext is None:
        return None
    try:
        missing = [f for f in _API if not hasattr(ext, f)]
        if missing:
            raise RuntimeError(f"stale build without {', '.join(missing)}: rebuild it")
        from mlxkv.codec import get_codec

        x = mx.random.normal((5, 2, 64), key=mx.random.key(7)) * 3
        for name in ("e8m4", "d4m3", "lloydm3"):
            codec = get_codec(name, seed=1)
            rotation, kw, _ = _plan(codec.kernel_layout, 64)
            got = ext.kv_encode(x, rotation, **kw)
            want = codec.encode(x)
            if not (mx.array_equal(got[0], want["codes"]).item()
                    and mx.array_equal(got[1].view(mx.uint16),
                                       want["scale"].view(mx.uint16)).item()):
                raise RuntimeError(f"smoke test: {name} codes differ from codec.encode")
    except Exception as e:  # noqa: BLE001  (any failure means: encode with codec.encode)
        log.warning("mlxkv._ext encode unavailable (%s: %s); KV writes use codec.encode",
                    type(e).__name__, e)
        return None
    return ext


def is_cpu_encode_available() -> bool:
    """True when the compiled encode loads and passes its bit-identity smoke test."""
    return _load_encode_ext() is not None


def _require_ext() -> ModuleType:
    ext = _load_encode_ext()
    if ext is None:
        raise RuntimeError("mlxkv._ext's encode is not available (scripts/build_ext.sh)")
    return ext


def _checked_plan(x: mx.array, codec: KVCodec):
    plan = _plan(codec.kernel_layout, x.shape[-1])
    if plan is None or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"the CPU encode does not cover {codec.name} for {x.dtype} rows "
                         f"of head_dim {x.shape[-1]}")
    return plan


def kv_encode_cpu_kernel(*, x: mx.array, codec: KVCodec) -> dict[str, mx.array]:
    """x [..., D] -> {codes: [..., D/8*m] uint8, scale: [..., 1] float16} (role names of
    the layout), bit-identical to `codec.encode(x)`.

    Raises:
        RuntimeError: the extension (or its encode) is not available.
        ValueError: a layout, head_dim or dtype the primitive does not encode.
    """
    ext = _require_ext()
    rotation, kw, names = _checked_plan(x, codec)
    codes, scale = ext.kv_encode(x, rotation, **kw)
    return {names[0]: codes, names[1]: scale}


def kv_write_cpu_kernel(*, pools: dict[str, mx.array], codec: KVCodec, slot_mapping: mx.array,
                        x: mx.array) -> dict[str, mx.array]:
    """Encode x [T, KVH, D] into `pools` ({name: [NB, BS, KVH, *]}, the codec's layout) at
    slots [T] -> the updated pool arrays (same names). Equal to `kv_write` with
    `codec.encode`; slots outside [0, NB * BS) are skipped. `pools` itself is not modified.

    Raises:
        RuntimeError: the extension (or its encode) is not available.
        ValueError: an uncovered layout, or shapes that do not match the pools.
    """
    ext = _require_ext()
    rotation, kw, names = _checked_plan(x, codec)
    codes, scale = ext.kv_encode_write(x, rotation, slot_mapping, pools[names[0]],
                                       pools[names[1]], **kw)
    return {names[0]: codes, names[1]: scale}


def cpu_write(*, pools: dict[str, mx.array], codec: KVCodec, slot_mapping: mx.array,
              x: mx.array) -> dict[str, mx.array] | None:
    """PoolWriter: `kv_write_cpu_kernel` where it applies; None (the store encodes with
    `kv_encode_ref` and scatters) when the extension is missing or failed its smoke test,
    or the layout, dtype or shape is not covered."""
    plan = _plan(codec.kernel_layout, x.shape[-1])
    ext = _load_encode_ext()
    if (plan is None or ext is None or x.ndim != 3 or x.shape[0] == 0
            or x.dtype not in FLOAT_DTYPES):
        return None
    rotation, kw, names = plan
    codes, scale = ext.kv_encode_write(x, rotation, slot_mapping, pools[names[0]],
                                       pools[names[1]], **kw)
    return {names[0]: codes, names[1]: scale}


__all__ = ["cpu_write", "encode_layout_supported", "is_cpu_encode_available",
           "is_write_supported", "kv_encode_cpu_kernel", "kv_encode_ref", "kv_write_cpu_kernel"]
