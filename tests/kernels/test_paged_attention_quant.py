"""paged_attention_quant_kernel (emulated) == codec.decode + reference attention, every codec."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from _data import make_case, max_err
from harness import EmulationError, emulate, mutate

from mlxkv.codec import get_codec
from mlxkv.kernels.paged_attention_quant import (
    paged_attention_quant,
    paged_attention_quant_kernel,
    paged_attention_quant_ref,
    plan_paged_attention_quant,
)


def make_quant_case(k_name, v_name, *, seq_lens, kvh, gqa, D, BS, dtype=mx.float32, seed=0):
    case = make_case(seq_lens=seq_lens, num_kv_heads=kvh, gqa=gqa, head_dim=D, block_size=BS,
                     dtype=dtype, seed=seed)
    k_codec, v_codec = get_codec(k_name, seed=0), get_codec(v_name, seed=1)
    k_fp, v_fp = case.pop("k_pool"), case.pop("v_pool")
    case.update(k_pool=k_codec.encode(k_fp.astype(mx.float32)),
                v_pool=v_codec.encode(v_fp.astype(mx.float32)),
                k_codec=k_codec, v_codec=v_codec)
    return case


# (k codec, v codec, dtype, head_dim, block_size, kv_heads, gqa, seq_lens, window, splits)
GRID = [
    ("int8", "int8", mx.float32, 64, 16, 2, 1, [1, 17, 40], None, 1),
    ("int4", "int4", mx.float32, 128, 32, 1, 4, [45, 2], 20, 2),
    ("e8m4", "e8m3", mx.float32, 128, 16, 2, 3, [33, 1, 64], None, 1),
    ("e8m2", "e8m2", mx.float32, 256, 16, 1, 8, [50, 17], None, 2),
    ("d4m3", "d4m2", mx.float32, 64, 32, 2, 4, [0, 70], None, 3),
    ("d4m4", "d4m4", mx.float16, 256, 32, 1, 1, [31, 65], 40, 1),
    ("e8m3", "e8m2", mx.bfloat16, 64, 16, 1, 3, [19, 5], None, 2),
    ("int4", "e8m3", mx.float32, 128, 16, 1, 2, [23], None, 1),  # independent K/V codecs
]
TOL = {mx.float32: 5e-5, mx.float16: 3e-3, mx.bfloat16: 3e-2}


@pytest.mark.parametrize("kc,vc,dtype,D,BS,KVH,G,lens,window,splits", GRID)
def test_quant_kernel_matches_decode_plus_reference(kc, vc, dtype, D, BS, KVH, G, lens, window,
                                                    splits, emulator):
    case = make_quant_case(kc, vc, seq_lens=lens, kvh=KVH, gqa=G, D=D, BS=BS, dtype=dtype,
                           seed=D + G)
    ref = paged_attention_quant_ref(**case, sliding_window=window)
    out = paged_attention_quant_kernel(**case, sliding_window=window, num_splits=splits,
                                       executor=emulator)
    assert out.shape == ref.shape and out.dtype == dtype
    scale = max(1.0, float(mx.max(mx.abs(ref.astype(mx.float32)))))
    assert max_err(out, ref) < TOL[dtype] * scale


def test_dispatcher_runs_the_kernel_on_metal_else_the_reference(metal_via_emulator,
                                                                 monkeypatch):
    # by name: mlxkv.kernels re-exports a function of the same name
    module = importlib.import_module("mlxkv.kernels.paged_attention_quant")
    case = make_quant_case("e8m4", "e8m3", seq_lens=[9], kvh=1, gqa=2, D=64, BS=16)
    launches = metal_via_emulator(module, "paged_attention_quant_kernel")
    out = paged_attention_quant(**case, num_splits=1)
    assert launches == ["mlxkv_paged_attention_quant", "mlxkv_paged_attention_combine"]
    assert max_err(out, paged_attention_quant_ref(**case)) < 5e-5
    lloyd = make_quant_case("lloydm4", "e8m3", seq_lens=[9], kvh=1, gqa=2, D=64, BS=16)
    assert max_err(paged_attention_quant(**lloyd), paged_attention_quant_ref(**lloyd)) == 0.0
    monkeypatch.setattr(module, "is_metal_available", lambda: False)
    assert max_err(paged_attention_quant(**case), paged_attention_quant_ref(**case)) == 0.0
    assert len(launches) == 2


@pytest.mark.parametrize("old,new", [
    ("(parity & 1u);\n    x[7]", "((parity + 1u) & 1u);\n    x[7]"),   # E8 a_7 parity
    ("for (int off = LPT; off < MLXKV_SIMD_WIDTH", "for (int off = 2 * LPT; off < MLXKV_SIMD_WIDTH"),
    ("for (int off = LPT / 2; off >= 1;", "for (int off = LPT / 2; off > 1;"),
    # neutral: a bijective relabelling of lanes inside a token's lane group changes nothing
    ("const int c0 = 8 * (lane % LPT);", "const int c0 = 8 * ((lane + 1) % LPT);"),
])
def test_planted_quant_bugs_are_caught(old, new):
    case = make_quant_case("e8m4", "e8m3", seq_lens=[37, 5], kvh=1, gqa=2, D=64, BS=16, seed=5)
    launch, _ = plan_paged_attention_quant(**case, num_splits=1)
    in_header = old not in launch.spec.source
    bad = mutate(launch, old, new, in_header=in_header)
    good_out = emulate(launch)[0]
    if "(lane + 1)" in new:  # neutral edit: must still pass (a harness that fails all is useless)
        assert max_err(emulate(bad)[0], good_out) == 0.0
        return
    try:
        bad_out = emulate(bad)[0]
    except EmulationError:
        return
    assert max_err(bad_out, good_out) > 1e-3


def test_quant_threadgroup_memory_limit():
    from mlxkv.kernels.paged_attention_quant import is_kernel_supported

    big = make_quant_case("e8m4", "e8m3", seq_lens=[3], kvh=1, gqa=16, D=256, BS=16)
    assert not is_kernel_supported(big["queries"], big["k_codec"], big["v_codec"], 1)
    with pytest.raises(ValueError, match="32 KiB"):
        plan_paged_attention_quant(**big)
    ok = make_quant_case("e8m4", "e8m3", seq_lens=[3], kvh=2, gqa=8, D=128, BS=16)
    assert is_kernel_supported(ok["queries"], ok["k_codec"], ok["v_codec"], 2)


def test_largest_accepted_gqa_runs_within_the_emulated_32_kib():
    """The plan's byte count agrees with the emulator's arena (which rejects > 32 KiB)."""
    from mlxkv.kernels.paged_attention import threadgroup_bytes
    from mlxkv.kernels.paged_attention_quant import fits_threadgroup, simdgroups_for

    gqa = max(g for g in range(1, 64) if fits_threadgroup(g, 256))
    assert threadgroup_bytes(gqa, 256, simdgroups_for(gqa, 256), rotated_query=True) > 30 * 1024
    case = make_quant_case("e8m4", "e8m3", seq_lens=[20], kvh=1, gqa=gqa, D=256, BS=16)
    out = paged_attention_quant_kernel(**case, num_splits=1, executor=emulate)
    assert max_err(out, paged_attention_quant_ref(**case)) < 5e-5
