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

from mlxkv.attention import default_decode_op
from mlxkv.codec import get_codec
from mlxkv.codec.base import AFFINE, KernelLayout
from mlxkv.kernels.paged_attention import paged_attention_ref
from mlxkv.kernels.paged_attention_cpu import (
    cpu_decode,
    is_cpu_kernel_available,
    paged_attention_cpu_kernel,
    paged_attention_quant_cpu_kernel,
)
from mlxkv.kernels.paged_attention_quant import paged_attention_quant_ref
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


@pytest.mark.parametrize(("arch", "spec"), [("llama", "fp32"), ("gemma3_text", "fp32"),
                                            ("llama", "int8"), ("gemma3_text", "int4"),
                                            ("llama", "e8:k4v3"), ("gemma3_text", "d4:k4v3"),
                                            ("llama", "lloyd:k4v3")])
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
        assert float(mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))) < 1e-4
    assert got_tokens == ref_tokens


def test_auto_backend_on_cpu_uses_the_primitive():
    if mx.metal.is_available():
        pytest.skip("Metal present: auto selects the Metal kernels")
    assert default_decode_op("auto") is cpu_decode
    assert default_decode_op("reference") is None
