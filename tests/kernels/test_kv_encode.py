"""kv_encode_kernel (emulated) vs LatticeCodec.encode: codes, scales, and the write path.

Codes and scales must be bit-identical, although the float32 arithmetic is not: the codec
rotates with a matmul (x @ R.T), the kernel with butterflies and one multiply by
1/sqrt(D), and the RMS sums in another order, so 80-90% of rotated coordinates differ in
their last bits. A code can differ only where a coordinate lies within that rounding noise
of a lattice decision boundary (or an RMS within it of an fp16 rounding boundary); none of
these seeded vectors does (0 of 7,200 differ at 600 vectors per case, measured), so any
difference here is a kernel bug. (On a GPU, simd_sum order and rsqrt precision differ again;
that is for an on-device check, not this one.)
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from harness import emulate, mutate

from mlxkv.codec import get_codec
from mlxkv.kernels.kv_encode import kv_encode, kv_encode_kernel, kv_write, plan_kv_encode


def _vectors(n, d, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, d)).astype(np.float32)
    x[0] = 0.0  # the zero vector: scale 0, all-zero code
    x[1, 0] *= 1e-3
    x[2, 1, : d // 2] *= 30.0  # outliers
    return mx.array(x).astype(dtype)


@pytest.mark.parametrize("name,D,dtype", [
    ("e8m2", 64, mx.float32), ("e8m3", 128, mx.float32), ("e8m4", 256, mx.float16),
    ("d4m2", 128, mx.float32), ("d4m3", 64, mx.bfloat16), ("d4m4", 128, mx.float32),
])
def test_kernel_codes_match_codec(name, D, dtype, emulator):
    codec = get_codec(name, seed=3)
    x = _vectors(24, D, dtype, seed=D)
    ref = codec.encode(x)
    out = kv_encode_kernel(x=x, codec=codec, executor=emulator)
    assert out["codes"].shape == ref["codes"].shape and out["codes"].dtype == mx.uint8
    assert out["scale"].shape == ref["scale"].shape and out["scale"].dtype == mx.float16
    assert np.array_equal(np.array(out["scale"]), np.array(ref["scale"]))
    assert np.array_equal(np.array(out["codes"]), np.array(ref["codes"]))
    assert not np.any(np.array(out["scale"])[0])  # the zero vector: scale 0


def test_planted_encode_bug_is_caught():
    codec = get_codec("e8m3", seed=0)
    x = _vectors(16, 64)
    launch = plan_kv_encode(x=x, codec=codec)
    bad = mutate(launch, "if (int(sum) % 4 != 0) {", "if (int(sum) % 2 != 0) {", in_header=True)
    codes = emulate(bad)[0]
    ref = codec.encode(x)["codes"].reshape(codes.shape)
    assert np.mean(np.all(np.array(codes) == np.array(ref), axis=-1)) < 0.5


def test_kv_write_scatters_into_slots():
    codec = get_codec("d4m3", seed=0)
    pools = {name: mx.zeros((5, 4, 2, *shape), dtype=dt)
             for name, (shape, dt) in codec.packed_spec(64, mx.float32).items()}
    x = _vectors(3, 64)
    slots = mx.array([6, 13, 19], dtype=mx.int32)

    def emulated(*, x, codec):
        return kv_encode_kernel(x=x, codec=codec, executor=emulate)

    kv_write(pools, codec, slots, x, encoder=emulated)
    flat = pools["codes"].reshape(20, 2, -1)
    ref = codec.encode(x)["codes"]
    assert np.array_equal(np.array(flat[slots]), np.array(ref))
    untouched = np.setdiff1d(np.arange(20), np.array(slots))
    assert not np.any(np.array(flat[mx.array(untouched)]))


def test_dispatcher_runs_the_kernel_on_metal_else_the_codec(metal_via_emulator, monkeypatch):
    # by name: mlxkv.kernels re-exports a function of the same name
    module = importlib.import_module("mlxkv.kernels.kv_encode")
    launches = metal_via_emulator(module, "kv_encode_kernel")
    x = _vectors(4, 128)
    for name, num_launches in (("e8m4", 1), ("int8", 1)):  # int8: no kernel, mx.quantize
        codec = get_codec(name, seed=0)
        out, ref = kv_encode(x=x, codec=codec), codec.encode(x)
        assert len(launches) == num_launches
        assert all(np.array_equal(np.array(out[k]), np.array(ref[k])) for k in ref)
    monkeypatch.setattr(module, "is_metal_available", lambda: False)
    kv_encode(x=x, codec=get_codec("e8m4", seed=0))
    assert launches == ["mlxkv_kv_encode"]
