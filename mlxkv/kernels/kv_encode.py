"""KV write path: encode K/V vectors into a codec's packed components, then scatter to slots.

Triad: `kv_encode_kernel` (metal/kv_encode.metal: Hadamard rotation, RMS scale and exact
E8/D4 nearest point, one threadgroup per vector), `kv_encode_ref` (= codec.encode, the
ground truth) and the `kv_encode` dispatcher. `kv_write` encodes (through the dispatcher)
and scatters the components into the pools at `slot_mapping`, like KVStore.write.

MLX custom kernels cannot write into an input in place, so the scatter stays an mx slice
update (in place when the pool has no other reference); the kernel produces only the
components of the new rows. (On the CPU, kv_encode_cpu.py's compiled primitive, a full MLX
Primitive, does encode straight into the pools.) Affine int4/int8 encode already is one fused MLX kernel
(mx.quantize), so only the lattice codecs have a custom encode kernel.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import mlx.core as mx

from mlxkv.codec.base import D4, E8, KVCodec
from mlxkv.codec.rotation import rotation_matrix
from mlxkv.kernels._hadamard import rotation_signs
from mlxkv.kernels._source import (
    KernelLaunch,
    is_metal_available,
    log_fallback_once,
    make_spec,
    run_metal,
)

Executor = Callable[[KernelLaunch], list[mx.array]]
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def _spec():
    return make_spec("mlxkv_kv_encode", ("x", "signs", "step"), ("codes", "scale"),
                     "kv_encode.metal")


def is_kernel_supported(x: mx.array, codec: KVCodec) -> bool:
    """True for lattice layouts (E8/D4, m = 2..4) at head_dim 64/128/256 and float inputs."""
    layout = codec.kernel_layout
    return (layout.kind in (E8, D4) and layout.bits in (2, 3, 4)
            and x.shape[-1] in SUPPORTED_HEAD_DIMS
            and x.dtype in (mx.float32, mx.float16, mx.bfloat16))


def plan_kv_encode(*, x: mx.array, codec: KVCodec) -> KernelLaunch:
    """Launch plan: grid (D, N), one threadgroup of D threads per vector of x [..., D]."""
    if not is_kernel_supported(x, codec):
        raise ValueError(f"kv_encode_kernel supports lattice codecs at D in "
                         f"{SUPPORTED_HEAD_DIMS}, got {getattr(codec, 'name', codec)} D={x.shape[-1]}")
    D = x.shape[-1]
    flat = x.reshape(-1, D)
    N = flat.shape[0]
    layout = codec.kernel_layout
    signs = rotation_signs(rotation_matrix(D, layout.rotation_seed))
    step = mx.array([layout.step], dtype=mx.float32)
    return KernelLaunch(
        spec=_spec(), inputs=[flat, signs, step],
        template=[("T", x.dtype), ("D", D), ("LAT", 1 if layout.kind == E8 else 2),
                  ("M", layout.bits)],
        grid=(D, max(N, 1), 1), threadgroup=(D, 1, 1),
        output_shapes=[(max(N, 1), D // 8 * layout.bits), (max(N, 1), 1)],
        output_dtypes=[mx.uint8, mx.float16])


def kv_encode_kernel(*, x: mx.array, codec: KVCodec,
                     executor: Executor = run_metal) -> dict[str, mx.array]:
    """Kernel path: x [..., D] -> {"codes": [..., D/8*m] uint8, "scale": [..., 1] float16}."""
    lead = x.shape[:-1]
    if 0 in lead:
        return kv_encode_ref(x=x, codec=codec)
    codes, scale = executor(plan_kv_encode(x=x, codec=codec))
    roles = codec.kernel_layout.roles
    return {roles["codes"]: codes.reshape(*lead, -1), roles["scales"]: scale.reshape(*lead, 1)}


def kv_encode_ref(*, x: mx.array, codec: KVCodec) -> dict[str, mx.array]:
    """Pure-mx twin: the codec's own encode (the ground truth)."""
    return codec.encode(x)


def kv_encode(*, x: mx.array, codec: KVCodec) -> dict[str, mx.array]:
    """Dispatcher: the Metal kernel for lattice codecs when Metal is available, else encode."""
    if is_metal_available() and is_kernel_supported(x, codec):
        return kv_encode_kernel(x=x, codec=codec)
    log_fallback_once("kv_encode", "no Metal device or no kernel for this codec")
    return kv_encode_ref(x=x, codec=codec)


def kv_write(pools: MutableMapping[str, mx.array], codec: KVCodec, slot_mapping: mx.array,
             x: mx.array, *, encoder: Callable[..., dict[str, mx.array]] = kv_encode) -> None:
    """Encode x [T, KVH, D] and store it at slots [T] of pools {name: [NB, BS, KVH, *]}.

    Rebinds each entry of `pools` to the updated array (MLX updates in place when nothing
    else references the pool).
    """
    for name, comp in encoder(x=x, codec=codec).items():
        pool = pools[name]
        flat = pool.reshape(-1, *pool.shape[2:])
        flat[slot_mapping] = comp.astype(pool.dtype)
        pools[name] = flat.reshape(pool.shape)
