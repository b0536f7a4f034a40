"""Round-trip pools (mlxkv.codec.roundtrip) give the packed pools' logits, prefill and decode.

benchmarks/quality.py measures dPPL on round-trip pools read by the compiled CPU decode
attention; this proves those logits are the packed layout's (decoded on every read by the
reference path), so the benchmark's numbers are the codec's.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxkv.attention import default_decode_op
from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.codec.roundtrip import RoundTripCodec, round_trip_layers
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_store import KVStore
from mlxkv.models.adapter import group_specs_for
from mlxkv.models.tiny import make_tiny_model
from mlxkv.runner import ModelRunner


@pytest.fixture(scope="module")
def wide():
    return make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                           hidden_size=128)


def _run(model, codecs, decode_op, windows, steps=6, block_size=4):
    groups = group_specs_for(model)
    blocks = [len(windows) * 8 + 1] * len(groups)
    store = KVStore(groups, blocks, block_size, mx.float32, codecs)
    cache = KVCacheManager(groups, blocks, block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, store, decode_op)
    half = len(windows[0]) - steps
    entries = []
    for i, w in enumerate(windows):
        cache.lookup(str(i), w)
        cache.allocate_slots(str(i), half)
        entries.append(SeqEntry(w[:half], 0, cache.slot_mapping(str(i), 0, half),
                                cache.block_tables(str(i))))
    out = [runner.forward(build_batch(entries))]
    for pos in range(half, len(windows[0])):
        entries = []
        for i, w in enumerate(windows):
            cache.allocate_slots(str(i), 1)
            entries.append(SeqEntry([w[pos]], pos, cache.slot_mapping(str(i), pos, pos + 1),
                                    cache.block_tables(str(i))))
        out.append(runner.forward(build_batch(entries)))
        mx.eval(out[-1], store.arrays())
    return mx.stack(out), store


@pytest.mark.parametrize("spec", ["e8:k6v5", "e8:k8v2", "d4:k7v3", "lloyd:k5v6", "int6",
                                  "int3,l1=e8:k4v4"])
def test_round_trip_pools_equal_packed_pools(wide, spec):
    windows = [[(5 * i + 3 * j) % 120 + 1 for i in range(17)] for j in range(2)]
    codecs = parse_kv_codec(spec, len(wide.layers))
    packed, packed_store = _run(wide, codecs, None, windows)
    # The dense decode op reads the round-trip pool; prefill stays on the reference path as
    # on the packed side (a wrapper has no prefill twin): prefill noise of ~1e-4 in the
    # hidden states can move a later layer's K across a quantization boundary, a real (and
    # large) difference that this test is not about.
    op = default_decode_op()
    rt, rt_store = _run(wide, round_trip_layers(codecs), lambda *a: op(*a), windows)
    assert packed_store.bytes_per_token() == rt_store.bytes_per_token()
    # same K/V values; only the attention summation order differs (fp32 noise)
    assert mx.allclose(packed, rt, atol=2e-4, rtol=1e-4).item()
    # and the comparison can fail: another rate's round trip moves the logits
    other = round_trip_layers(parse_kv_codec("e8:k2v2", len(wide.layers)))
    moved, _ = _run(wide, other, default_decode_op(), windows)
    assert not mx.allclose(packed, moved, atol=2e-4, rtol=1e-4).item()


def test_round_trip_codec_reports_the_inner_bytes():
    codec = RoundTripCodec(parse_kv_codec("e8:k6v5", 1)[0][0])
    assert codec.bytes_per_vector(64, mx.float32) == 64 // 8 * 6 + 2
    assert codec.metadata["m"] == 6 and codec.metadata["roundtrip"]
    assert codec.packed_spec(64, mx.float32) == {"x": ((64,), mx.float32)}
