"""paged_attention_kernel (emulated Metal body) == paged_attention_ref over a shape grid."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from _data import TOL, make_case, max_err
from harness import emulate

from mlxkv.kernels import paged_attention, paged_attention_kernel, paged_attention_ref
from mlxkv.kernels.paged_attention import default_num_splits

# (dtype, head_dim, block_size, kv_heads, gqa, seq_lens, window, splits)
GRID = [
    (mx.float32, 64, 16, 2, 1, [1, 17, 40], None, 1),
    (mx.float32, 64, 32, 3, 4, [45, 2, 33], None, 2),
    (mx.float32, 128, 32, 1, 3, [33, 1, 64], None, 2),
    (mx.float16, 128, 16, 2, 4, [0, 5, 100], None, 3),
    (mx.float32, 128, 16, 2, 4, [70, 20, 3], 24, 2),
    (mx.float32, 256, 16, 1, 8, [50, 17], None, 1),
    (mx.bfloat16, 256, 32, 2, 3, [31, 65], 40, 4),
    (mx.float32, 64, 16, 1, 8, [3, 1], None, 5),  # more splits than keys
]


@pytest.mark.parametrize("dtype,D,BS,KVH,G,lens,window,splits", GRID)
def test_kernel_matches_reference(dtype, D, BS, KVH, G, lens, window, splits, emulator):
    case = make_case(seq_lens=lens, num_kv_heads=KVH, gqa=G, head_dim=D, block_size=BS,
                     dtype=dtype, seed=D + BS + G)
    ref = paged_attention_ref(**case, sliding_window=window)
    out = paged_attention_kernel(**case, sliding_window=window, num_splits=splits,
                                 executor=emulator)
    assert out.shape == ref.shape and out.dtype == dtype
    assert max_err(out, ref) < TOL[dtype]


def test_empty_sequence_gives_zeros():
    case = make_case(seq_lens=[0, 9], num_kv_heads=1, gqa=2, head_dim=64, block_size=16)
    out = paged_attention_kernel(**case, num_splits=2, executor=emulate)
    assert float(mx.max(mx.abs(out[0]))) == 0.0
    assert max_err(out, paged_attention_ref(**case)) < 2e-5


def test_auto_splits_on_long_tables():
    case = make_case(seq_lens=[1100, 300], num_kv_heads=1, gqa=2, head_dim=64, block_size=32)
    assert default_num_splits(case["block_tables"].shape[1] * 32) == 3
    out = paged_attention_kernel(**case, executor=emulate)
    assert max_err(out, paged_attention_ref(**case)) < 2e-5


def test_reference_matches_dense_sdpa():
    """The reference itself: equals mx.fast SDPA on the gathered, length-cut K/V."""
    case = make_case(seq_lens=[21], num_kv_heads=2, gqa=3, head_dim=64, block_size=16)
    ref = paged_attention_ref(**case, sliding_window=8)
    table = case["block_tables"][0]
    k = case["k_pool"][table].reshape(-1, 2, 64)[13:21].transpose(1, 0, 2)[None]
    v = case["v_pool"][table].reshape(-1, 2, 64)[13:21].transpose(1, 0, 2)[None]
    dense = mx.fast.scaled_dot_product_attention(case["queries"][:, :, None], k, v,
                                                 scale=case["scale"])
    assert max_err(ref, dense[:, :, 0]) < 1e-5


def test_dispatcher_runs_the_kernel_on_metal_else_the_reference(metal_via_emulator,
                                                                 monkeypatch):
    # by name: mlxkv.kernels re-exports a function of the same name
    module = importlib.import_module("mlxkv.kernels.paged_attention")
    case = make_case(seq_lens=[5, 12], num_kv_heads=1, gqa=2, head_dim=64, block_size=16)
    launches = metal_via_emulator(module, "paged_attention_kernel")
    out = paged_attention(**case, num_splits=2)
    assert launches == ["mlxkv_paged_attention", "mlxkv_paged_attention_combine"]
    assert max_err(out, paged_attention_ref(**case)) < 2e-5
    odd = make_case(seq_lens=[5], num_kv_heads=1, gqa=2, head_dim=96, block_size=16)
    assert max_err(paged_attention(**odd), paged_attention_ref(**odd)) == 0.0  # head_dim 96
    monkeypatch.setattr(module, "is_metal_available", lambda: False)
    assert max_err(paged_attention(**case), paged_attention_ref(**case)) == 0.0
    assert len(launches) == 2


def test_bad_inputs_raise():
    case = make_case(seq_lens=[5], num_kv_heads=1, gqa=2, head_dim=64, block_size=16)
    with pytest.raises(ValueError):
        paged_attention_kernel(**{**case, "block_tables": case["block_tables"].astype(mx.int64)},
                               executor=emulate)
    with pytest.raises(ValueError):
        paged_attention_kernel(**{**case, "queries": case["queries"][:, :1, :32]},
                               executor=emulate)


def test_threadgroup_memory_limit_declines_instead_of_miscompiling():
    """GQA 32 at head_dim 256 would need > 32 KiB of threadgroup memory: no kernel."""
    from mlxkv.kernels.paged_attention import is_kernel_supported, plan_paged_attention

    case = make_case(seq_lens=[3], num_kv_heads=1, gqa=32, head_dim=256, block_size=16)
    assert not is_kernel_supported(case["queries"], case["k_pool"])
    with pytest.raises(ValueError, match="32 KiB"):
        plan_paged_attention(**case)
    small = make_case(seq_lens=[3], num_kv_heads=2, gqa=8, head_dim=256, block_size=16)
    assert is_kernel_supported(small["queries"], small["k_pool"])


def test_largest_accepted_gqa_runs_within_the_emulated_32_kib():
    """The plan's byte count agrees with the emulator's arena (which rejects > 32 KiB)."""
    from mlxkv.kernels.paged_attention import fits_threadgroup, simdgroups_for, threadgroup_bytes

    gqa = max(g for g in range(1, 64) if fits_threadgroup(g, 256))
    assert threadgroup_bytes(gqa, 256, simdgroups_for(gqa, 256)) > 30 * 1024
    case = make_case(seq_lens=[20], num_kv_heads=1, gqa=gqa, head_dim=256, block_size=16)
    out = paged_attention_kernel(**case, num_splits=1, executor=emulate)
    assert max_err(out, paged_attention_ref(**case)) < 2e-5
