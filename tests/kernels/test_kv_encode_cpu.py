"""The compiled CPU KV encode (mlxkv._ext, csrc/encode.cpp) == codec.encode, bit for bit.

Codes and fp16 scales are compared as bits over E8 / D4 / Lloyd at every rate (2..8) and
head dims 64 / 128 / 256, on rows built to hit the edges: zero rows (the two E8 parities
tie), huge rows (the fp16 scale overflows to inf), tiny rows (subnormal or zero scales),
constant, one-hot and integer rows. The nearest-point search is also compared on its own
with targets placed on ties (half-integers for rint, equal parity costs, equal move costs).
The store round trip writes prefill chunks and decode rows through a fragmented block
table. Skips only when the extension was never built (as test_cpu_paged_attention).
"""

from __future__ import annotations

import importlib.util
import os

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.codec import get_codec
from mlxkv.codec.lattice import d4_nearest, e8_nearest
from mlxkv.kernels import kv_encode_cpu
from mlxkv.kernels.kv_encode_cpu import (
    cpu_write,
    is_cpu_encode_available,
    kv_encode_cpu_kernel,
    kv_write_cpu_kernel,
)
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.kv_store import KVStore

if importlib.util.find_spec("mlxkv._ext") is None:
    if os.environ.get("CI"):
        pytest.fail("mlxkv._ext not built: scripts/build_ext.sh failed in setup",
                    pytrace=False)
    pytest.skip("mlxkv._ext not built (scripts/build_ext.sh)", allow_module_level=True)

RATES = (2, 3, 4, 5, 6, 7, 8)


def _ext():
    from mlxkv import _ext

    return _ext


def edge_rows(num_rows: int, head_dim: int, seed: int) -> mx.array:
    """[num_rows, 2, D]: Gaussian rows of mixed magnitude, then the edge rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_rows, 2, head_dim)).astype(np.float32)
    x *= np.exp(rng.uniform(-4, 4, (num_rows, 2, 1))).astype(np.float32)
    edges = [np.zeros(head_dim), np.full(head_dim, 3e5), np.full(head_dim, -7e4),
             rng.standard_normal(head_dim) * 1e-6, rng.standard_normal(head_dim) * 1e-9,
             np.full(head_dim, 0.5), np.eye(head_dim)[3] * 2.0,
             rng.integers(-3, 4, head_dim), rng.integers(-1, 2, head_dim) * 0.25]
    for i, row in enumerate(edges):
        x[i % num_rows, i // num_rows % 2] = row
    return mx.array(x)


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == mx.float16:
            a, b = a.view(mx.uint16), b.view(mx.uint16)
        rows = mx.any(a != b, axis=-1)
        assert not mx.any(rows).item(), f"{name}: {mx.sum(rows).item()} rows differ"


def test_encode_loads_and_passes_its_smoke_test():
    assert is_cpu_encode_available()


@pytest.mark.parametrize("family", ["e8", "d4", "lloyd"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_codes_are_bit_identical_to_codec_encode(family, head_dim):
    x = edge_rows(24, head_dim, seed=head_dim)
    for bits in RATES:
        codec = get_codec(f"{family}m{bits}", seed=bits)
        assert_bit_identical(kv_encode_cpu_kernel(x=x, codec=codec), codec.encode(x))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_rows_match(dtype):
    x = edge_rows(16, 128, seed=5).astype(dtype)
    for name in ("e8m4", "d4m3", "lloydm4"):
        codec = get_codec(name, seed=2)
        assert_bit_identical(kv_encode_cpu_kernel(x=x, codec=codec), codec.encode(x))


def test_a_prefill_sized_write_split_over_threads_matches():
    """1,200 rows (more than one thread's share): codes and pools as codec.encode's."""
    x = edge_rows(600, 64, seed=11)
    codec = get_codec("e8m3", seed=4)
    assert_bit_identical(kv_encode_cpu_kernel(x=x, codec=codec), codec.encode(x))
    pools = {"codes": mx.zeros((40, 16, 2, 24), dtype=mx.uint8),
             "scale": mx.zeros((40, 16, 2, 1), dtype=mx.float16)}
    slots = mx.array(np.random.default_rng(0).permutation(640)[:600].astype(np.int32))
    got = kv_write_cpu_kernel(pools=pools, codec=codec, slot_mapping=slots, x=x)
    want = codec.encode(x)
    assert mx.array_equal(got["codes"].reshape(-1, 2, 24)[slots], want["codes"]).item()
    assert mx.array_equal(got["scale"].reshape(-1, 2, 1)[slots].view(mx.uint16),
                          want["scale"].view(mx.uint16)).item()


def _tie_targets(width: int, bits: int, seed: int) -> mx.array:
    """Targets on a quarter grid (rint ties, equal costs), a few out of the box."""
    rng = np.random.default_rng(seed)
    span = 2 ** (bits + 1) + 2
    grid = rng.integers(-4 * span, 4 * span + 1, (400, width)) / 4.0
    special = [np.full(width, -0.5), np.full(width, 0.5), np.zeros(width),
               np.full(width, 1.5), np.arange(width) / 2.0 - 1.0,
               np.full(width, -0.5) + np.eye(width)[0], np.full(width, 2.0**bits + 7)]
    return mx.array(np.concatenate([np.stack(special), grid]).astype(np.float32))


@pytest.mark.parametrize("bits", RATES)
def test_nearest_point_breaks_ties_like_the_codec(bits):
    tau = _tie_targets(8, bits, seed=bits)
    j, p = e8_nearest(tau, bits)
    got = _ext().nearest_point(tau, kind="e8", bits=bits)
    assert mx.array_equal(got[:, :8], j).item()
    assert mx.array_equal(got[:, 8], p.astype(mx.float32)).item()
    target = _tie_targets(4, bits, seed=100 + bits)
    assert mx.array_equal(_ext().nearest_point(target, kind="d4", bits=bits),
                          d4_nearest(target, bits)).item()


def test_zero_rows_take_the_even_parity():
    """t = 0: both E8 parities cost 2.0 exactly; the codec keeps p = 0 (strict <)."""
    codes = kv_encode_cpu_kernel(x=mx.zeros((1, 64)), codec=get_codec("e8m4"))["codes"]
    assert codes.tolist()[0][0] & 1 == 0


def test_square_is_mlx_power():
    """x ** 2 on MLX's CPU is powf, which differs from x * x by one ulp on ~1e-4 of the
    floats: the encode's square must follow powf (strided over every exponent)."""
    bits = np.arange(0, 2**31, 2**31 // (1 << 21) + 7, dtype=np.uint32)
    x = mx.array(np.concatenate([bits, bits | np.uint32(2**31)]).view(np.float32))
    x = mx.where(mx.isnan(x), 0.0, x)
    want, got = (x**2).view(mx.uint32), _ext().powf_square(x).view(mx.uint32)
    assert mx.array_equal(got, want).item()
    assert not mx.array_equal(x * x, x**2).item()  # the test can tell the two apart


# -- writes into the store --------------------------------------------------------------

CODECS = {0: ("e8m4", "e8m3"), 1: ("d4m5", "lloydm3"), 2: ("int8", "e8m2")}


def make_stores(block_size=4, num_blocks=24):
    spec = KVGroupSpec((0, 1, 2), 3, 64)
    codecs = {layer: tuple(get_codec(n, seed=layer * 2 + i) for i, n in enumerate(names))
              for layer, names in CODECS.items()}
    ref = KVStore([spec], [num_blocks], block_size, mx.float32, codecs)
    fast = KVStore([spec], [num_blocks], block_size, mx.float32, codecs)
    fast.writer = cpu_write
    return ref, fast


def test_store_round_trip_through_a_fragmented_table():
    """A 9-token prefill chunk and three decode rows, written through a shuffled table:
    pools bit-identical to the encode + scatter path, and gather returns decode(encode(x))."""
    ref, fast = make_stores()
    table = [17, 3, 11, 20, 6]  # fragmented, not ascending
    rng = np.random.default_rng(0)
    tokens = []
    for start, count in ((0, 9), (9, 1), (10, 1), (11, 1)):
        pos = np.arange(start, start + count)
        slots = mx.array([int(table[p // 4] * 4 + p % 4) for p in pos], dtype=mx.int32)
        for layer in CODECS:
            k, v = (mx.array(rng.standard_normal((count, 3, 64)).astype(np.float32))
                    for _ in range(2))
            for store in (ref, fast):
                store.write(layer, slots, k, v)
            tokens.append((layer, k, v))
        mx.eval(ref.arrays(), fast.arrays())
    for a, b in zip(ref.arrays(), fast.arrays(), strict=True):
        assert mx.array_equal(a.view(mx.uint8), b.view(mx.uint8)).item()
    for layer in CODECS:
        got_k, got_v = fast.gather(layer, table, 12)
        ks = mx.concatenate([k for lid, k, _ in tokens if lid == layer])
        vs = mx.concatenate([v for lid, _, v in tokens if lid == layer])
        k_codec, v_codec = fast.codecs[layer]
        assert mx.array_equal(got_k, k_codec.decode(k_codec.encode(ks), mx.float32)).item()
        assert mx.array_equal(got_v, v_codec.decode(v_codec.encode(vs), mx.float32)).item()


def test_write_is_in_place_when_the_pool_is_not_referenced():
    ref, fast = make_stores(block_size=16, num_blocks=4096)  # codes pools of 12 MiB
    x = mx.random.normal((1, 3, 64))
    mx.eval(x)
    pool = fast.k_pool(0)
    size = pool["codes"].nbytes
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    pool.update(kv_write_cpu_kernel(pools=pool, codec=fast.codecs[0][0],
                                    slot_mapping=mx.array([77]), x=x))
    mx.eval(pool)
    assert mx.get_peak_memory() - before < size // 2


def test_referenced_pool_is_copied_not_modified():
    _, fast = make_stores()
    pool, codec = fast.k_pool(0), fast.codecs[0][0]
    old = dict(pool)
    x = mx.random.normal((2, 3, 64))
    new = kv_write_cpu_kernel(pools=pool, codec=codec, slot_mapping=mx.array([5, 9]), x=x)
    mx.eval(new)
    assert not mx.any(old["codes"]).item() and not mx.any(old["scale"]).item()
    want = codec.encode(x)
    assert mx.array_equal(new["codes"].reshape(-1, 3, 32)[mx.array([5, 9])],
                          want["codes"]).item()


def test_writer_declines_what_it_does_not_cover(monkeypatch):
    pools = {"x": mx.zeros((4, 4, 3, 64))}
    x = mx.zeros((1, 3, 64))
    slots = mx.array([1])
    assert cpu_write(pools=pools, codec=get_codec("fp32"), slot_mapping=slots, x=x) is None
    assert cpu_write(pools=pools, codec=get_codec("int4"), slot_mapping=slots, x=x) is None
    assert cpu_write(pools=pools, codec=get_codec("e8m4"), slot_mapping=slots,
                     x=x.astype(mx.int32)) is None
    monkeypatch.setattr(kv_encode_cpu, "_load_encode_ext", lambda: None)  # no extension
    assert cpu_write(pools=pools, codec=get_codec("e8m4"), slot_mapping=slots, x=x) is None
    ref, fast = make_stores()
    for store in (ref, fast):  # the store falls back to codec.encode, no error
        store.write(0, slots, x + 1, x - 1)
    for a, b in zip(ref.arrays(), fast.arrays(), strict=True):
        assert mx.array_equal(a.view(mx.uint8), b.view(mx.uint8)).item()


def test_backends_install_the_writer_only_for_the_compiled_path():
    from mlxkv.kernels.selfcheck import detect_backend

    if mx.metal.is_available():
        pytest.skip("Metal present: the Metal encode kernel is used instead")
    assert detect_backend("auto").writer is cpu_write
    assert detect_backend("reference").writer is None


def test_engine_writes_through_the_primitive(monkeypatch):
    """An engine on e8/lloyd pools calls the compiled writer for every layer and gives
    exactly the logits and tokens of the same engine with the pure-mx encode."""
    from oracles import assert_same, make_llm, run

    from mlxkv.kernels import selfcheck
    from mlxkv.models.tiny import make_tiny_model

    calls = []

    def counting(**kw):
        out = cpu_write(**kw)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(selfcheck, "cpu_write", counting)
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=4,
                            num_key_value_heads=2, hidden_size=128)
    prompts = [[(5 * i + 2) % 97 + 1 for i in range(21)], [4, 8, 15, 16, 23, 42]]
    fast = make_llm(model, kv_codec="e8:k4v3")
    got = run(fast, prompts)
    assert calls and all(calls) and len(calls) >= 2 * 2 * len(model.layers)
    slow = make_llm(model, kv_codec="e8:k4v3")
    slow.engine.store.writer = None
    want = run(slow, prompts)
    for rid in want:
        assert_same(got[rid], want[rid], rid, atol=0.0)
