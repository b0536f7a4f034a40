"""Codec tests: lattice membership, box, exact nearest point (brute force), packing, rotation,
error bounds, zero and extreme vectors, spec parsing, and the engine on compressed blocks."""

from __future__ import annotations

import hashlib
import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.codec import get_codec, parse_kv_codec
from mlxkv.codec.lattice import (
    LatticeCodec,
    _pack_words,
    _unpack_words,
    d4_nearest,
    e8_nearest,
    word_dtype,
)
from mlxkv.codec.lloyd import levels
from mlxkv.codec.rotation import rotate, rotation_matrix, unrotate
from mlxkv.errors import InvalidRequestError

ALL = ["int8", "int6", "int5", "int4", "int3", "int2",
       *[f"{fam}m{m}" for fam in ("e8", "d4", "lloyd") for m in range(2, 9)]]
# Relative MSE on Gaussian vectors, the worst over D = 64/128/256 as measured with the
# fitted steps; the bounds add 25%. Each extra bit divides the error by 3.1 to 4.
_MEASURED = {"int8": 2.92e-05, "int6": 0.00047, "int5": 0.00195, "int4": 0.0084, "int3": 0.036,
             "int2": 0.156, "e8m2": 0.101, "e8m3": 0.031, "e8m4": 0.00952, "e8m5": 0.00285,
             "e8m6": 0.000913, "e8m7": 0.000286, "e8m8": 7.48e-05, "d4m2": 0.145,
             "d4m3": 0.0451, "d4m4": 0.0139, "d4m5": 0.00416, "d4m6": 0.00127, "d4m7": 0.00041,
             "d4m8": 0.000118, "lloydm2": 0.117, "lloydm3": 0.0339, "lloydm4": 0.00913,
             "lloydm5": 0.00246, "lloydm6": 0.000627, "lloydm7": 0.000159, "lloydm8": 4.05e-05}
BOUND = {name: 1.25 * v for name, v in _MEASURED.items()}


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


@pytest.mark.parametrize("bits", range(2, 9))
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


@pytest.mark.parametrize("num_bytes", range(1, 9))
def test_pack_unpack_bit_exact(num_bytes):
    dt = word_dtype(num_bytes)
    words = mx.array(np.random.default_rng(3).integers(0, 2 ** (8 * num_bytes), size=(5, 7),
                                                       dtype=np.uint64), dtype=dt)
    packed = _pack_words(words, num_bytes)
    assert packed.shape == (5, 7 * num_bytes) and packed.dtype == mx.uint8
    assert mx.array_equal(_unpack_words(packed, num_bytes), words).item()
    top = np.array(packed).reshape(5, 7, num_bytes)[..., -1]  # little-endian: last = high byte
    assert np.array_equal(top, (np.array(words) >> np.uint64(8 * (num_bytes - 1))) & 0xFF)


@pytest.mark.parametrize("lattice", ["e8", "d4"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_code_word_decodes_and_re_encodes_to_itself(lattice, bits):
    """The packing is a bijection onto the box code: all 8m (D4: 8m - 2) bits carry
    information, and a code word's point re-encodes to the same word at every rate."""
    codec = LatticeCodec(lattice, bits)
    used = 8 * bits - (2 if lattice == "d4" else 0)
    rng = np.random.default_rng(bits)
    words = mx.array(rng.integers(0, 2**used, size=(512,), dtype=np.uint64),
                     dtype=word_dtype(bits))
    if lattice == "e8":  # a_7's low bit is implied: the top bit field holds a_7 >> 1
        points = codec._e8_points(words)
        again = codec._e8_words(points)
    else:
        points = codec._d4_points(words)
        again = codec._d4_words(points)
    assert mx.array_equal(again, words).item()
    assert codec.bytes_per_vector(64, mx.float32) == 64 * bits // 8 + 2


# sha256 prefixes of codes and scales from the m <= 4 codecs before rates 5..8 existed
# (git 1c1da17, the layout the Metal kernels read), at the then step constants.
_GOLDEN = {("e8", 2, 1.0): "a201673d13f0d60e", ("e8", 3, 0.6): "02c6f2aaa4653751",
           ("e8", 4, 0.35): "43721df079191c4e", ("d4", 3, 0.55): "89091777cf008e70",
           ("d4", 4, 0.30): "c79cf23a776a88b1"}


@pytest.mark.parametrize(("lattice", "bits", "step"), sorted(_GOLDEN))
def test_low_rate_codes_are_byte_identical_to_the_kernel_layout(lattice, bits, step):
    x = mx.array(np.random.default_rng(11).normal(size=(16, 64)).astype(np.float32))
    codes = np.array(LatticeCodec(lattice, bits, step=step).encode(x)["codes"])
    assert hashlib.sha256(codes.tobytes()).hexdigest()[:16] == _GOLDEN[(lattice, bits, step)]


def test_lloyd_levels_are_the_gaussian_lloyd_max_levels():
    published = {2: (0.4528, 1.5104), 3: (0.2451, 0.7560, 1.3439, 2.1519)}
    for m, pos in published.items():
        assert np.allclose(np.array(levels(m))[2 ** (m - 1):], pos, atol=2e-4)
    for m in range(2, 9):
        lv = np.array(levels(m))
        assert len(lv) == 2**m and np.all(np.diff(lv) > 0) and np.allclose(lv, -lv[::-1])


@pytest.mark.parametrize("name", ["e8m3", "d4m2", "lloydm4", "int4", "e8m7", "lloydm8", "int6"])
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
    meta = layers[1][0].metadata
    assert (meta["codec"], meta["m"], meta["seed"], meta["scale"]) == ("e8", 4, 5, "fp16")
    assert parse_kv_codec("auto", 4) is None
    assert parse_kv_codec("int4", 2)[0][0].name == "int4"
    assert parse_kv_codec("int6", 2)[1][1].name == "int6"
    eight = parse_kv_codec("lloyd:k8v5", 2)
    assert eight[0][0].name == "lloydm8" and eight[0][1].name == "lloydm5"
    for bad in ("e9:k4v3", "e8:k9v3", "e8:k1v3", "int7", "int9", "e8:k4v3,boundary=x",
                "e8:k4v3,l9=int8", "e8:k4v3,l1=int7", "e8:k4v3,lx=int8", "auto:0.5x"):
        with pytest.raises(InvalidRequestError):
            parse_kv_codec(bad, 4)


def test_per_layer_overrides_and_boundary():
    layers = parse_kv_codec("e8:k5v5,boundary=1,l1-2=int8,l2=lloyd:k7v6", 5)
    names = [(k.name, v.name) for k, v in (layers[i] for i in range(5))]
    assert names == [("identity", "identity"), ("int8", "int8"), ("lloydm7", "lloydm6"),
                     ("e8m5", "e8m5"), ("identity", "identity")]
    only = parse_kv_codec("auto,l0=e8:k6v6", 2)
    assert only[0][0].name == "e8m6" and only[1][0].name == "identity"


def test_identity_codec_is_bit_exact():
    x = mx.random.normal((4, 2, 64))
    codec = get_codec("identity")
    assert mx.array_equal(codec.decode(codec.encode(x), mx.float32), x).item()
