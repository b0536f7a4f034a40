"""paged_attention_cpu_kernel (the compiled MLX primitive, mlxkv._ext) == paged_attention_ref.

Skips only when the extension was never built (scripts/build_ext.sh); a built extension
that fails to load is a failure. The engine tests count the primitive's calls, so a
dispatcher that silently fell back to the reference would not pass.
"""

from __future__ import annotations

import importlib.util
import os

import mlx.core as mx
import pytest
from _data import TOL, make_case, max_err
from test_engine_kernels import run_steps
from test_paged_attention_quant import make_quant_case

from mlxkv.attention import _mask, default_decode_op
from mlxkv.codec import get_codec, parse_kv_codec
from mlxkv.codec.base import AFFINE, E8, KernelLayout
from mlxkv.kernels.paged_attention import paged_attention_ref
from mlxkv.kernels.paged_attention_cpu import (
    _layer_plan,
    cpu_decode,
    cpu_prefill,
    is_cpu_kernel_available,
    paged_attention_cpu_kernel,
    paged_attention_quant_cpu_kernel,
    paged_prefill_cpu_kernel,
)
from mlxkv.kernels.paged_attention_quant import gather_decoded, paged_attention_quant_ref
from mlxkv.models.tiny import make_tiny_model

if importlib.util.find_spec("mlxkv._ext") is None:
    if os.environ.get("CI"):  # CI's setup builds it: a failed build must not pass as a skip
        pytest.fail("mlxkv._ext not built: scripts/build_ext.sh failed in setup",
                    pytrace=False)
    pytest.skip("mlxkv._ext not built (scripts/build_ext.sh)", allow_module_level=True)

# (dtype, head_dim, block_size, kv_heads, gqa, seq_lens, window)
GRID = [
    (mx.float32, 64, 16, 2, 1, [1, 17, 40], None),
    (mx.float32, 64, 32, 3, 2, [45, 2, 33, 64], None),
    (mx.float32, 128, 16, 2, 4, [1, 16, 100], None),
    (mx.float32, 128, 32, 1, 4, [33, 1, 95], None),
    (mx.float32, 64, 16, 2, 4, [70, 20, 3], 24),   # window inside, across and past a block
    (mx.float32, 128, 32, 1, 2, [65, 31, 1], 32),  # window == block size
    (mx.float32, 64, 16, 3, 3, [0, 9], None),      # an empty sequence
    (mx.float16, 64, 16, 3, 3, [50, 17], None),
    (mx.float16, 128, 32, 2, 4, [81, 5], 40),
    (mx.bfloat16, 64, 32, 2, 2, [31, 65], None),
    (mx.float32, 256, 16, 1, 8, [50, 17], None),
    (mx.float32, 16, 16, 2, 2, [3, 38], None),     # head_dim the Metal kernels do not cover
]


def _kernel(case, window=None, **kw):
    return paged_attention_cpu_kernel(**case, sliding_window=window, **kw)


def test_extension_loads():
    assert is_cpu_kernel_available()


@pytest.mark.parametrize("dtype,D,BS,KVH,G,lens,window", GRID)
def test_kernel_matches_reference(dtype, D, BS, KVH, G, lens, window):
    case = make_case(seq_lens=lens, num_kv_heads=KVH, gqa=G, head_dim=D, block_size=BS,
                     dtype=dtype, seed=D + BS + G)
    ref = paged_attention_ref(**case, sliding_window=window)
    out = _kernel(case, window)
    assert out.shape == ref.shape and out.dtype == dtype
    assert max_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_thread_split_does_not_change_the_result(threads):
    case = make_case(seq_lens=[300, 7, 129, 64, 1], num_kv_heads=3, gqa=3, head_dim=64,
                     block_size=16, seed=3)
    assert max_err(_kernel(case, num_threads=threads), paged_attention_ref(**case)) < 2e-5


@pytest.mark.parametrize(("splits", "window"), [(2, None), (3, 50), (7, None), (16, 24)])
def test_key_splits_merge_to_the_reference(splits, window):
    """Key-range splits (more splits than keys included: empty splits) merge exactly."""
    case = make_case(seq_lens=[300, 7, 0, 129, 1], num_kv_heads=2, gqa=4, head_dim=128,
                     block_size=16, seed=splits)
    ref = paged_attention_ref(**case, sliding_window=window)
    for threads in (1, 3):
        out = _kernel(case, window, num_threads=threads, num_splits=splits)
        assert max_err(out, ref) < 2e-5


# (k codec, v codec, dtype, head_dim, block_size, kv_heads, gqa, seq_lens, window, splits)
QUANT_GRID = [
    ("int8", "int8", mx.float32, 64, 16, 2, 1, [1, 17, 40], None, 0),
    ("int4", "int4", mx.float32, 128, 32, 1, 4, [45, 2, 0], 20, 2),
    ("int4", "int8", mx.float32, 256, 16, 2, 3, [33, 1, 64], None, 1),
    ("int8", "int4", mx.float16, 64, 32, 3, 2, [70, 31], 40, 3),
    ("int4", "int4", mx.bfloat16, 128, 16, 1, 8, [19, 100], None, 0),
    ("int8", "int8", mx.float32, 192, 16, 2, 2, [50, 9], None, 0),  # a generic head_dim
    ("e8m4", "e8m4", mx.float32, 64, 16, 3, 3, [40, 17, 1], None, 0),
    ("e8m4", "e8m3", mx.float32, 128, 16, 2, 3, [33, 1, 64], None, 1),
    ("e8m2", "e8m2", mx.float32, 256, 16, 1, 8, [50, 17], None, 2),
    ("d4m3", "d4m2", mx.float32, 64, 32, 2, 4, [0, 70], None, 3),
    ("d4m4", "d4m4", mx.float16, 256, 32, 1, 1, [31, 65], 40, 1),
    ("e8m3", "e8m2", mx.bfloat16, 64, 16, 1, 3, [19, 5], None, 2),
    ("lloydm4", "lloydm3", mx.float32, 128, 16, 2, 2, [47, 3], 24, 0),
    ("lloydm2", "lloydm2", mx.float32, 64, 32, 1, 4, [90], None, 2),
    ("int4", "e8m3", mx.float32, 128, 16, 1, 2, [23, 40], None, 0),  # independent K/V codecs
    ("e8m4", "int8", mx.float32, 64, 16, 2, 2, [23, 40], 30, 0),
    ("fp32", "e8m4", mx.float32, 64, 16, 2, 2, [23, 40], None, 0),   # fp K, rotated V
]
# Rates 5..8: one little-endian word of m bytes per 8 coordinates, past 32 bits (uint64).
WIDE_QUANT_GRID = [
    ("e8m5", "e8m6", mx.float32, 64, 16, 3, 3, [41, 17, 1], None, 0),
    ("e8m7", "e8m8", mx.float32, 128, 16, 2, 2, [33, 0, 64], 24, 2),
    ("e8m6", "e8m5", mx.float16, 64, 32, 3, 3, [70, 9], None, 3),
    ("d4m5", "d4m6", mx.float32, 64, 16, 2, 4, [45, 2, 19], None, 1),
    ("d4m7", "d4m8", mx.float32, 256, 16, 1, 8, [50, 17], 40, 0),
    ("lloydm5", "lloydm6", mx.float32, 64, 16, 3, 3, [47, 3], None, 2),
    ("lloydm7", "lloydm8", mx.float32, 128, 32, 2, 2, [65, 31], 20, 0),
    ("lloydm7", "lloydm3", mx.bfloat16, 64, 16, 1, 3, [19, 5], None, 0),  # wide K, narrow V
    ("e8m6", "lloydm5", mx.float32, 64, 16, 3, 3, [29, 60], None, 0),     # mixed families
    ("d4m8", "int8", mx.float32, 64, 16, 2, 2, [23, 40], 30, 0),
]
QUANT_GRID += WIDE_QUANT_GRID
QUANT_TOL = {mx.float32: 5e-5, mx.float16: 3e-3, mx.bfloat16: 3e-2}


@pytest.mark.parametrize("kc,vc,dtype,D,BS,KVH,G,lens,window,splits", QUANT_GRID)
def test_quant_kernel_matches_decode_plus_reference(kc, vc, dtype, D, BS, KVH, G, lens,
                                                    window, splits):
    case = make_quant_case(kc, vc, seq_lens=lens, kvh=KVH, gqa=G, D=D, BS=BS, dtype=dtype,
                           seed=D + G)
    ref = paged_attention_quant_ref(**case, sliding_window=window)
    out = paged_attention_quant_cpu_kernel(**case, sliding_window=window, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    scale = max(1.0, float(mx.max(mx.abs(ref.astype(mx.float32)))))
    assert max_err(out, ref) < QUANT_TOL[dtype] * scale


def test_planted_wrong_codes_are_caught():
    """The comparison can fail: the same codes read with V's seed for K (a wrong query
    rotation), or as D4 instead of E8, give a different answer."""
    case = make_quant_case("e8m4", "e8m4", seq_lens=[40, 17], kvh=2, gqa=2, D=64, BS=16)
    ref = paged_attention_quant_ref(**case)
    assert max_err(paged_attention_quant_cpu_kernel(**case), ref) < 5e-5
    wrong_seed = {**case, "k_codec": case["v_codec"]}
    assert max_err(paged_attention_quant_cpu_kernel(**wrong_seed), ref) > 1e-2
    as_d4 = {**case, "k_codec": get_codec("d4m4", seed=0)}
    assert max_err(paged_attention_quant_cpu_kernel(**as_d4), ref) > 1e-2


@pytest.mark.parametrize("name", ["e8m6", "d4m7", "lloydm8"])
def test_planted_corrupt_wide_code_is_caught(name):
    """The comparison can fail at wide rates: one bit flipped in the last byte of a visible
    K code word (bit 8m - 3, the top bit D4 uses; outside any 32-bit word) moves the
    kernel's answer, and the reference over the corrupted pool still agrees with it."""
    case = make_quant_case(name, name, seq_lens=[40, 17], kvh=2, gqa=2, D=64, BS=16)
    ref = paged_attention_quant_ref(**case)
    assert max_err(paged_attention_quant_cpu_kernel(**case), ref) < 5e-5
    codes = case["k_pool"]["codes"]  # [NB, BS, KVH, D/8 * m] uint8
    m = case["k_codec"].bits
    block_id = int(case["block_tables"][0, 0])
    hit = (mx.arange(codes.size).reshape(codes.shape) ==
           ((block_id * codes.shape[1] + 3) * codes.shape[2]) * codes.shape[3] + m - 1)
    bad = {**case, "k_pool": {**case["k_pool"], "codes": mx.where(hit, codes ^ 0x20, codes)}}
    assert max_err(paged_attention_quant_cpu_kernel(**bad), ref) > 1e-3
    assert max_err(paged_attention_quant_cpu_kernel(**bad), paged_attention_quant_ref(**bad)) < 5e-5


def test_quant_kernel_declines_unknown_layouts():
    case = make_quant_case("int8", "int8", seq_lens=[5], kvh=1, gqa=2, D=64, BS=16)
    odd = type("Int3", (), {"name": "int3", "kernel_layout": KernelLayout(
        AFFINE, 3, {"codes": "q", "scales": "scales", "biases": "biases"}, group_size=64)})()
    with pytest.raises(ValueError):
        paged_attention_quant_cpu_kernel(**{**case, "k_codec": odd})


def test_empty_sequence_gives_zeros():
    case = make_case(seq_lens=[0, 9], num_kv_heads=1, gqa=2, head_dim=64, block_size=16)
    assert float(mx.max(mx.abs(_kernel(case)[0]))) == 0.0


def test_planted_wrong_table_is_caught():
    """The comparison can fail: swapping a full block with the partial last one changes the
    visible keys (swapping two full blocks would not: decode attention is order-free), and
    a window off by one moves the visible range. Padding past the length is never read."""
    case = make_case(seq_lens=[40, 33], num_kv_heads=2, gqa=2, head_dim=64, block_size=16)
    ref = paged_attention_ref(**case)
    table = case["block_tables"]
    swapped = table[:, mx.array([0, 2, 1, 3])]
    assert max_err(_kernel({**case, "block_tables": swapped}), ref) > 1e-2
    padded_wrong = mx.where(table == 0, table[0, 0], table)  # padding points at a real block
    assert max_err(_kernel({**case, "block_tables": padded_wrong}), _kernel(case)) == 0.0
    assert max_err(_kernel(case, 20), paged_attention_ref(**case, sliding_window=21)) > 1e-3


def test_bad_inputs_raise_value_error():
    case = make_case(seq_lens=[5], num_kv_heads=2, gqa=2, head_dim=64, block_size=16)
    with pytest.raises(ValueError):
        _kernel({**case, "queries": case["queries"][:, :3]})  # H not a multiple of KVH
    with pytest.raises(ValueError):
        _kernel({**case, "k_pool": case["k_pool"].astype(mx.float16)})


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        out = cpu_decode(*args)
        self.calls += out is not None
        return out


# Relative logit tolerance of whole engine steps. Each layer's attention matches to ~5e-6
# (the grids above), but with an affine codec a difference that small can move a K/V value
# of the next layer across a rounding boundary: one int8 code step, then ~1e-3 relative in
# the logits (measured: 7e-4 on the tiny llama). Lattice codes showed no such flip here.
# Half-precision pools round every K/V to fp16 / bf16 the same way (one ulp is ~1e-3
# relative): measured 2e-5 to 7e-4 on the tiny models, against 1e-6 to 6e-6 for fp32 pools;
# the kernel-level grids compare the same pools at 5e-7.
ENGINE_TOL = {"fp32": 1e-4, "fp16": 3e-3, "bf16": 3e-3, "int8": 3e-3, "int4": 3e-3,
              "e8:k4v3": 1e-4, "d4:k4v3": 1e-4, "lloyd:k4v3": 1e-4, "e8:k6v5": 1e-4,
              "lloyd:k7v3": 1e-4, "d4:k8v5": 1e-4}


@pytest.mark.parametrize(("arch", "spec"), [("llama", "fp32"), ("gemma3_text", "fp32"),
                                            # half-precision pools under an fp32 model
                                            ("llama", "fp16"), ("gemma3_text", "bf16"),
                                            ("llama", "int8"), ("gemma3_text", "int4"),
                                            ("llama", "e8:k4v3"), ("gemma3_text", "d4:k4v3"),
                                            ("llama", "lloyd:k4v3"), ("llama", "e8:k6v5"),
                                            ("gemma3_text", "lloyd:k7v3"),
                                            ("llama", "d4:k8v5")])
def test_engine_decode_through_the_primitive_matches_reference(arch, spec):
    """Greedy decode steps: the primitive on every layer and codec (gemma3: sliding
    windows), against the reference path's logits."""
    model = make_tiny_model(arch, head_dim=64, num_attention_heads=6, num_key_value_heads=2,
                            hidden_size=128)
    ref_steps, ref_tokens = run_steps(model, spec, None)
    op = Counting()
    got_steps, got_tokens = run_steps(model, spec, None, decode_op=op)
    assert op.calls == 3 * len(model.layers)
    for ref, got in zip(ref_steps, got_steps, strict=True):
        assert float(mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))) < ENGINE_TOL[spec]
    assert got_tokens == ref_tokens


@pytest.mark.parametrize("family", ["e8", "d4", "lloyd"])
def test_auto_allocation_runs_every_layer_through_the_primitive(family):
    """`auto:3.0x` on SmolLM2-135M (30 layers, head_dim 64, packaged profile) picks 3..8
    bits per tensor; every layer's pair of layouts is one the primitive decodes."""
    layers = parse_kv_codec(f"auto:3.0x,family={family}", 30, "smollm2-135m-instruct")
    rates = {c.kernel_layout.bits for pair in layers.values() for c in pair}
    assert max(rates) > 4  # the allocation does use the wide rates
    for k_codec, v_codec in layers.values():
        assert _layer_plan(k_codec.kernel_layout, v_codec.kernel_layout, 64) == "packed"


def test_rates_past_8_bits_go_to_the_reference():
    """Rates no codec writes (9 bits: words past 64 bits) and head dims that are not a
    multiple of 8 are declined, not mis-decoded."""
    ok = get_codec("e8m8").kernel_layout
    wide = KernelLayout(E8, 9, {"codes": "codes", "scales": "scale"}, rotation_seed=0)
    assert _layer_plan(ok, ok, 64) == "packed"
    assert _layer_plan(wide, ok, 64) is None and _layer_plan(ok, ok, 60) is None


def test_auto_backend_on_cpu_uses_the_primitive():
    if mx.metal.is_available():
        pytest.skip("Metal present: auto selects the Metal kernels")
    assert default_decode_op("auto") is cpu_decode
    assert default_decode_op("reference") is None


# -- prefill chunks over a cached prefix ----------------------------------------------------

def prefill_reference(case, q, q_start, lens, window):
    """Per sequence: codec.decode of its blocks, then fp32 masked SDPA of its chunk rows."""
    k = gather_decoded(case["k_pool"], case["k_codec"], case["block_tables"])
    v = gather_decoded(case["v_pool"], case["v_codec"], case["block_tables"])
    outs = []
    for b, L in enumerate(lens):
        n = q_start[b + 1] - q_start[b]
        if n == 0:
            continue
        qb = q[q_start[b]:q_start[b + 1]].astype(mx.float32).transpose(1, 0, 2)[None]
        mask = _mask(mx.arange(L - n, L), k.shape[2], window)
        out = mx.fast.scaled_dot_product_attention(qb, k[b:b + 1], v[b:b + 1],
                                                   scale=case["scale"], mask=mask)
        outs.append(out[0].transpose(1, 0, 2))
    return mx.concatenate(outs).astype(q.dtype)


def _prefill(case, q, q_start, window=None, **kw):
    return paged_prefill_cpu_kernel(
        queries=q, k_pool=case["k_pool"], v_pool=case["v_pool"], k_codec=case["k_codec"],
        v_codec=case["v_codec"], block_tables=case["block_tables"],
        query_start=mx.array(q_start), seq_lens=case["seq_lens"], scale=case["scale"],
        sliding_window=window, **kw)


# (k codec, v codec, dtype, head_dim, block_size, kv_heads, gqa, lens, chunk rows, window)
# rows == lens: no cached prefix; rows 1: a decode row; rows 0: nothing to compute.
PREFILL_GRID = [
    ("fp32", "fp32", mx.float32, 64, 16, 2, 3, [40, 17, 70, 5], [13, 1, 30, 5], None),
    ("fp32", "fp32", mx.float32, 128, 32, 1, 4, [33, 64, 1], [33, 20, 1], 20),
    ("fp32", "fp32", mx.float32, 256, 16, 2, 1, [50, 9], [7, 9], None),
    ("fp32", "fp32", mx.float32, 64, 16, 1, 8, [100, 31], [17, 0], 24),
    ("fp16", "fp16", mx.float16, 64, 16, 2, 2, [45, 16], [12, 16], 40),
    ("bf16", "bf16", mx.bfloat16, 128, 16, 1, 2, [31, 65], [31, 2], None),
    ("fp16", "bf16", mx.float32, 64, 16, 2, 2, [45, 16], [12, 16], 20),  # fp32 model
    ("int8", "int4", mx.float32, 64, 16, 2, 2, [40, 17], [9, 17], None),
    ("e8m4", "e8m3", mx.float32, 64, 32, 2, 3, [70, 3], [25, 1], None),
    ("lloydm3", "d4m4", mx.float32, 128, 16, 2, 1, [48, 20], [16, 5], 17),
]
WIDE_PREFILL_GRID = [
    ("e8m6", "e8m5", mx.float32, 64, 16, 3, 3, [40, 17, 5], [13, 1, 5], None),
    ("e8m8", "e8m7", mx.float32, 128, 32, 2, 2, [70, 33], [25, 33], 20),
    ("d4m6", "d4m8", mx.float32, 64, 16, 2, 4, [45, 9], [12, 9], None),
    ("lloydm7", "lloydm5", mx.float32, 64, 16, 3, 3, [48, 20], [16, 1], 17),
    ("lloydm8", "d4m5", mx.float16, 64, 16, 1, 2, [31, 65], [31, 2], None),
]
PREFILL_GRID += WIDE_PREFILL_GRID


@pytest.mark.parametrize("kc,vc,dtype,D,BS,KVH,G,lens,rows,window", PREFILL_GRID)
def test_prefill_kernel_matches_reference(kc, vc, dtype, D, BS, KVH, G, lens, rows, window):
    case = make_quant_case(kc, vc, seq_lens=lens, kvh=KVH, gqa=G, D=D, BS=BS, dtype=dtype,
                           seed=D + G)
    q_start = [0]
    for n in rows:
        q_start.append(q_start[-1] + n)
    q = mx.random.normal((q_start[-1], KVH * G, D), key=mx.random.key(D)).astype(dtype)
    ref = prefill_reference(case, q, q_start, lens, window)
    for threads in (1, 3):
        out = _prefill(case, q, q_start, window, num_threads=threads)
        assert out.shape == q.shape and out.dtype == dtype
        scale = max(1.0, float(mx.max(mx.abs(ref.astype(mx.float32)))))
        assert max_err(out, ref) < QUANT_TOL[dtype] * scale


def test_prefill_over_shared_blocks_and_planted_off_by_one():
    """Two sequences whose tables share their first two blocks (a prefix hit after COW):
    the same rows of both give the same output. A causal mask shifted by one key (the
    chunk placed one position later) must not match."""
    case = make_quant_case("fp32", "fp32", seq_lens=[40, 40], kvh=2, gqa=2, D=64, BS=16)
    table = case["block_tables"]
    shared = mx.concatenate([table[:1, :2], table[:1, :2]])
    case["block_tables"] = mx.concatenate([shared, table[:, 2:]], axis=1)
    case["block_tables"] = mx.where(mx.arange(table.shape[1]) < 2, case["block_tables"][0],
                                    case["block_tables"])
    q = mx.random.normal((10, 4, 64), key=mx.random.key(1))
    q = mx.concatenate([q[:5], q[:5]])
    out = _prefill(case, q, [0, 5, 10])
    ref = prefill_reference(case, q, [0, 5, 10], [40, 40], None)
    assert max_err(out, ref) < 2e-5
    assert max_err(out[:5], out[5:]) > 1e-3  # rows 35-39 differ in their last (own) block
    late = {**case, "seq_lens": case["seq_lens"] + 1}
    assert max_err(_prefill(late, q, [0, 5, 10]), ref) > 1e-3


def test_decode_over_shared_blocks_matches_reference():
    """Decode rows of three sequences whose tables share their first two blocks (a prefix
    hit), one of them an `e8` pool: each matches the reference, and two rows with the same
    query and the same blocks agree while a row whose own last block differs does not."""
    for kc in ("fp32", "e8m4"):
        case = make_quant_case(kc, kc, seq_lens=[40, 40, 40], kvh=2, gqa=2, D=64, BS=16)
        table = case["block_tables"]
        shared = mx.where(mx.arange(table.shape[1]) < 2, table[0], table)
        shared = mx.concatenate([shared[:2], shared[:1]])  # row 2 is row 0's table
        q = mx.random.normal((3, 4, 64), key=mx.random.key(2))
        q = mx.stack([q[0], q[0], q[0]])
        got = paged_attention_quant_cpu_kernel(**{**case, "block_tables": shared, "queries": q})
        ref = paged_attention_quant_ref(**{**case, "block_tables": shared, "queries": q})
        assert max_err(got, ref) < 5e-5
        assert max_err(got[0], got[2]) < 1e-6
        assert max_err(got[0], got[1]) > 1e-3  # block 2 (keys 32-39) is not shared


def test_portable_build_matches_the_simd_build():
    """MLXKV_CPU_SIMD=0 forces the portable (no AVX2) build of the same kernels."""
    import subprocess
    import sys
    code = (
        "import mlx.core as mx, sys; sys.path.insert(0, 'tests/kernels')\n"
        "import mlxkv._ext as e; assert e.simd_level() == 0, e.simd_level()\n"
        "from test_cpu_paged_attention import *\n"
        "for row in GRID[:4] + GRID[-2:]:\n"
        "    test_kernel_matches_reference(*row)\n"
        "for row in QUANT_GRID[6:10]:\n"
        "    test_quant_kernel_matches_decode_plus_reference(*row)\n"
        "for row in WIDE_QUANT_GRID[::3]:\n"
        "    test_quant_kernel_matches_decode_plus_reference(*row)\n"
        "for row in PREFILL_GRID[:2] + PREFILL_GRID[-2:]:\n"
        "    test_prefill_kernel_matches_reference(*row)\n"
        "print('portable ok')\n")
    env = {**os.environ, "MLXKV_CPU_SIMD": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stderr[-2000:]


def _count_prefill_calls(monkeypatch) -> list[bool]:
    """Route the primitive's prefill twin through a wrapper; one entry per call (True when
    the primitive took the layer)."""
    import mlxkv.attention as attention

    calls = []

    def counting(*args):
        out = cpu_prefill(*args)
        calls.append(out is not None)
        return out
    monkeypatch.setitem(attention.PREFILL_OPS, cpu_decode, counting)
    return calls


@pytest.mark.parametrize("spec", ["int8", "fp16"])
def test_engine_prefill_through_the_primitive_matches_reference(monkeypatch, spec):
    """Prefill steps (two prompts in one batch) run cpu_prefill once per layer and match
    the reference path's logits (fp16: half-precision pools under an fp32 model)."""

    calls = _count_prefill_calls(monkeypatch)
    model = make_tiny_model("gemma3_text", head_dim=64, num_attention_heads=4,
                            num_key_value_heads=2, hidden_size=128)
    ref_steps, ref_tokens = run_steps(model, spec, None)
    got_steps, got_tokens = run_steps(model, spec, None, decode_op=cpu_decode)
    assert calls and all(calls) and len(calls) == len(model.layers)
    for ref, got in zip(ref_steps, got_steps, strict=True):
        assert float(mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))) < ENGINE_TOL[spec]
    assert got_tokens == ref_tokens


def test_engine_built_from_config_runs_the_prefill_twin(monkeypatch):
    """An LLMEngine built the normal way (its KernelGuard is the runner's op) sends batches
    with prefill chunks through cpu_prefill, and its logits equal the reference engine's."""
    from oracles import assert_same, run

    from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlxkv.llm import LLM

    calls = _count_prefill_calls(monkeypatch)
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=4,
                            num_key_value_heads=2, hidden_size=128)
    prompts = [[(7 * i + 3) % 97 + 1 for i in range(37)], [5, 9, 11, 2, 40, 41, 3]]

    def llm(backend):
        return LLM(EngineConfig(cache=CacheConfig(block_size=4, num_blocks=256),
                                scheduler=SchedulerConfig(max_num_batched_tokens=16),
                                attention=backend), loaded=(model, None))
    fast = llm("auto")
    assert fast.engine.kernels.report()["backend"] == "cpu-ext"
    got = run(fast, prompts)
    assert calls and all(calls)
    want = run(llm("reference"), prompts)
    for rid in want:
        assert_same(got[rid], want[rid], f"cpu-ext vs reference {rid}")
