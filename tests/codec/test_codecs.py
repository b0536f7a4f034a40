"""Codec tests: lattice membership, box, exact nearest point (brute force), packing, rotation,
error bounds, zero and extreme vectors, spec parsing, and the engine on compressed blocks."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.codec import get_codec, parse_kv_codec
from mlxkv.codec.lattice import LatticeCodec, _pack_words, _unpack_words, d4_nearest, e8_nearest
from mlxkv.codec.rotation import rotate, rotation_matrix, unrotate
from mlxkv.errors import InvalidRequestError

ALL = ["int8", "int4", "e8m2", "e8m3", "e8m4", "d4m2", "d4m3", "d4m4", "lloydm2", "lloydm3",
       "lloydm4"]
# Relative MSE bounds on Gaussian vectors, measured (e8m4 0.0099, e8m3 0.032, e8m2 0.10,
# d4: 0.015 / 0.046 / 0.146, lloyd: 0.0094 / 0.035 / 0.116, int4 0.0082) plus ~25% margin.
BOUND = {"int8": 1e-4, "int4": 0.011, "e8m4": 0.0125, "e8m3": 0.04, "e8m2": 0.125,
         "d4m4": 0.019, "d4m3": 0.058, "d4m2": 0.18, "lloydm4": 0.012, "lloydm3": 0.044,
         "lloydm2": 0.145}


def rel_mse(codec, x):
    y = codec.decode(codec.encode(x), mx.float32)
    return (mx.sum((y - x) ** 2) / mx.sum(x * x)).item()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_error_within_measured_bound_and_layout(name, dim):
    codec = get_codec(name)
    x = mx.random.normal((64, 2, dim), key=mx.random.key(dim))
    packed = codec.encode(x)
    spec = codec.packed_spec(dim, mx.float32)
    for comp, (trailing, dtype) in spec.items():
        assert packed[comp].shape == (64, 2, *trailing) and packed[comp].dtype == dtype
    nbytes = sum(int(np.prod(t)) * d.size for t, d in spec.values())
    assert nbytes == codec.bytes_per_vector(dim, mx.float32)
    assert rel_mse(codec, x) < BOUND[name]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8_codes_are_lattice_points_in_the_box(bits):
    codec = LatticeCodec("e8", bits)
    x = mx.random.normal((200, 64), key=mx.random.key(bits)) * 3
    u = np.array(codec.decode_rotated(codec.encode(x)) /
                 codec.encode(x)["scale"].astype(mx.float32)).reshape(-1, 8)
    j = 2 * (u - 0.25)
    assert np.allclose(j, np.round(j))
    j = np.round(j).astype(int)
    assert np.all((j % 2) == (j[:, :1] % 2))  # one parity per block
    assert np.all(j.sum(axis=1) % 4 == 0)
    assert j.min() >= -(2**bits) and j.max() <= 2**bits - 1


def _e8_points(bits):
    size = 2**bits
    pts = []
    for p in (0, 1):
        vals = range(-size + p, size, 2)
        for j in itertools.product(vals, repeat=8):
            if sum(j) % 4 == 0:
                pts.append(j)
    return np.array(pts, dtype=np.float32)


@pytest.mark.parametrize(("bits", "num", "spread"), [(1, 300, 1.5), (2, 40, 3.0)])
def test_e8_nearest_is_exact_against_brute_force(bits, num, spread):
    pts = _e8_points(bits)  # every point of the box (2^16 at m = 2)
    rng = np.random.default_rng(bits)
    tau = rng.normal(size=(num, 8)).astype(np.float32) * spread
    j, _ = e8_nearest(mx.array(tau), bits)
    got = np.sum((np.array(j) - tau) ** 2, axis=1)
    best = np.min(((pts[None] - tau[:, None]) ** 2).sum(-1), axis=1)
    assert np.allclose(got, best, atol=1e-4)


def test_d4_nearest_against_brute_force():
    bits = 3
    half = 2 ** (bits - 1)
    pts = np.array([k for k in itertools.product(range(-half, half), repeat=4)
                    if sum(k) % 2 == 0], dtype=np.float32)
    tau = np.random.default_rng(2).normal(size=(300, 4)).astype(np.float32) * 3
    k = np.array(d4_nearest(mx.array(tau), bits))
    got = ((k - tau) ** 2).sum(1)
    best = np.min(((pts[None] - tau[:, None]) ** 2).sum(-1), axis=1)
    assert np.allclose(got, best, atol=1e-4)


@pytest.mark.parametrize("num_bytes", [2, 3, 4])
def test_pack_unpack_bit_exact(num_bytes):
    words = mx.array(np.random.default_rng(3).integers(0, 2 ** (8 * num_bytes), size=(5, 7)),
                     dtype=mx.uint32)
    assert mx.array_equal(_unpack_words(_pack_words(words, num_bytes), num_bytes), words).item()


@pytest.mark.parametrize("name", ["e8m3", "d4m2", "lloydm4", "int4"])
def test_zero_and_extreme_vectors(name):
    codec = get_codec(name)
    zero = mx.zeros((3, 64))
    assert mx.array_equal(codec.decode(codec.encode(zero), mx.float32), zero).item()
    for scale in (1e-3, 1e3):  # fp16 scale range: tiny and large vectors stay finite
        x = mx.random.normal((8, 64), key=mx.random.key(5)) * scale
        assert rel_mse(codec, x) < BOUND[name] * 1.5


def test_rotation_orthonormal_and_preserves_dot_products():
    r = np.array(rotation_matrix(128, 7))
    assert np.allclose(r @ r.T, np.eye(128), atol=1e-5)
    q, k = mx.random.normal((4, 128)), mx.random.normal((4, 128))
    assert mx.allclose(mx.sum(rotate(q, 7) * rotate(k, 7), -1), mx.sum(q * k, -1),
                       atol=1e-4).item()
    assert mx.allclose(unrotate(rotate(q, 7), 7), q, atol=1e-5).item()
    assert not np.allclose(rotation_matrix(128, 7), rotation_matrix(128, 8))


def test_spec_parsing():
    layers = parse_kv_codec("e8:k4v3,boundary=1,seed=5", 4)
    assert layers[0][0].name == "identity" and layers[3][1].name == "identity"
    assert layers[1][0].name == "e8m4" and layers[1][1].name == "e8m3"
    assert layers[1][0].metadata == {"codec": "e8", "m": 4, "seed": 5, "scale": "fp16"}
    assert parse_kv_codec("auto", 4) is None
    assert parse_kv_codec("int4", 2)[0][0].name == "int4"
    for bad in ("e9:k4v3", "e8:k5v3", "int3", "e8:k4v3,boundary=x"):
        with pytest.raises(InvalidRequestError):
            parse_kv_codec(bad, 4)


def test_identity_codec_is_bit_exact():
    x = mx.random.normal((4, 2, 64))
    codec = get_codec("identity")
    assert mx.array_equal(codec.decode(codec.encode(x), mx.float32), x).item()
