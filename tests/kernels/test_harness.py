"""The emulator itself: MLX-identical signatures, SIMD/barrier semantics, and planted bugs.

A harness that passes everything proves nothing; these tests mutate real kernel bodies
(drop a barrier, shift a loop bound, diverge a simd op, read out of bounds) and require the
emulated run to fail, by a wrong result or by an EmulationError, never by a crash.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from _data import make_case, max_err
from harness import EmulationError, emulate, kernel_name, make_kernel_source, mutate

from mlxkv.codec import get_codec
from mlxkv.kernels._source import KernelLaunch, KernelSpec
from mlxkv.kernels.kv_encode import plan_kv_encode
from mlxkv.kernels.paged_attention import (
    paged_attention_kernel,
    paged_attention_ref,
    plan_paged_attention,
)
from mlxkv.kernels.paged_attention_combine import (
    paged_attention_combine_ref,
    plan_paged_attention_combine,
)
from mlxkv.kernels.paged_attention_quant import plan_paged_attention_quant

DEMO_BODY = "out[thread_position_in_grid.x] = T(x[0] * s + idx[0] + x_shape[0] + N + F);"


def _demo_launch(body=DEMO_BODY, grid=(4, 1, 1), tg=(4, 1, 1)):
    spec = KernelSpec("demo", ("x", "s", "idx"), ("out",), body, "// hdr\n")
    return KernelLaunch(spec, [mx.ones((16,)), mx.array(2.0), mx.array([1, 2, 3], mx.int32)],
                        [("T", mx.float16), ("N", 4), ("F", True)], grid, tg,
                        [(4,)], [mx.float16])


def test_signature_is_mlx_write_signature():
    """Hand-derived from how MLX 0.32 writes a custom kernel's template and signature."""
    name = "custom_kernel_demo__float16_t_4_1_float_floats_int32_tc_float16_t"
    assert kernel_name(_demo_launch()) == name
    expected = (
        "// hdr\ntemplate <typename T, int N, bool F>\n"
        f"[[kernel]] void {name}(\n"
        "  const device float* x [[buffer(0)]],\n"
        "  const constant int* x_shape [[buffer(1)]],\n"
        "  const constant float& s [[buffer(2)]],\n"
        "  const constant int32_t* idx [[buffer(3)]],\n"
        "  device float16_t* out [[buffer(4)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        f"{DEMO_BODY}\n}}\n\n"
        f'template [[host_name("{name}")]] [[kernel]] decltype({name}<float16_t, 4, 1>) '
        f"{name}<float16_t, 4, 1>;\n")
    assert make_kernel_source(_demo_launch()) == expected


def test_demo_kernel_runs():
    out = emulate(_demo_launch())[0]
    assert out.tolist() == [2 + 1 + 16 + 4 + 1] * 4


def test_simd_ops_and_partial_threadgroups():
    body = """
    float v = float(thread_index_in_simdgroup);
    float sv = simd_sum(v);
    float mv = simd_max(v);
    float xv = simd_shuffle_xor(v, ushort(5));
    float dn = simd_shuffle_down(v, ushort(3));
    const uint t = thread_position_in_grid.x;
    out[t * 5 + 0] = sv;
    out[t * 5 + 1] = mv;
    out[t * 5 + 2] = xv;
    out[t * 5 + 3] = dn + 0.0f * x_shape[0] * s * idx[0];
    out[t * 5 + 4] = float(threads_per_threadgroup.x);
    """
    launch = _demo_launch(body, grid=(96, 1, 1), tg=(64, 1, 1))  # second group: 32 threads
    launch.output_shapes, launch.output_dtypes = [(96, 5)], [mx.float32]
    out = np.array(emulate(launch)[0])
    lane = np.arange(96) % 32
    assert (out[:, 0] == 496).all() and (out[:, 1] == 31).all()
    assert (out[:, 2] == (lane ^ 5)).all()
    assert (out[:, 3] == np.where(lane + 3 < 32, lane + 3, lane)).all()
    assert (out[:64, 4] == 64).all() and (out[64:, 4] == 32).all()


def _attention_case():
    return make_case(seq_lens=[37, 5, 64], num_kv_heads=2, gqa=4, head_dim=64, block_size=16,
                     seed=3)


def _run_attention(launch):
    o_part, _ = emulate(launch)
    return o_part[:, 0]


def test_unmutated_attention_passes():
    case = _attention_case()
    out = _run_attention(plan_paged_attention(**case, num_splits=1))
    assert max_err(out, paged_attention_ref(**case)) < 2e-5


@pytest.mark.parametrize("old,new", [
    ("threadgroup_barrier(mem_flags::mem_threadgroup);\n\nfor (uint idx", "\nfor (uint idx"),
    ("j < end;", "j <= end;"),
    ("j / BS]", "(j + 1) / BS]"),
    ("const int start = lo + split * chunk;", "const int start = lo + split * chunk + 1;"),
])
def test_planted_bug_is_caught(old, new):
    case = _attention_case()
    launch = mutate(plan_paged_attention(**case, num_splits=1), old, new)
    try:
        out = _run_attention(launch)
    except EmulationError:
        return
    assert not max_err(out, paged_attention_ref(**case)) < 1e-3


@pytest.mark.parametrize("new,message", [
    # Both halves reach a simd_sum, but at two call sites: on Apple GPUs each half would
    # reduce only its own 16 lanes, so the emulator must not merge them into one sum.
    ("if (lane < 16) s = simd_sum(s); else s = simd_sum(s);", "divergent simd ops"),
    ("if (lane < 16) { s = simd_sum(s); }", "not reached by every lane"),
])
def test_divergent_simd_op_is_an_error(new, message):
    case = _attention_case()
    launch = mutate(plan_paged_attention(**case, num_splits=1), "s = simd_sum(s);", new)
    with pytest.raises(EmulationError, match=message):
        emulate(launch)


def _simd_demo(body):
    launch = _demo_launch(body, grid=(64, 1, 1), tg=(64, 1, 1))  # two simdgroups
    launch.output_shapes, launch.output_dtypes = [(64,)], [mx.float32]
    return launch


@pytest.mark.parametrize("op,args", [
    ("simd_max", ""), ("simd_shuffle_xor", ", ushort(1)"), ("simd_broadcast", ", ushort(0)")])
def test_divergent_simd_ops_on_one_line_are_an_error(op, args):
    body = f"""
    const uint lane = thread_index_in_simdgroup;
    const float v = float(lane);
    out[thread_position_in_grid.x] = lane < 16 ? {op}(v{args}) : {op}(-v{args});
    """
    with pytest.raises(EmulationError, match=rf"divergent simd ops.*{op}.*{op}"):
        emulate(_simd_demo(body))


def test_distinct_simd_sites_are_fine_when_each_simdgroup_is_uniform():
    """Call-site keying rejects only divergence inside a simdgroup, not uniform branches."""
    body = """
    const float v = float(thread_index_in_simdgroup);
    float r = 0.0f;
    if (simdgroup_index_in_threadgroup == 0) { r = simd_max(v); } else { r = simd_sum(v); }
    if (N > 2) { r += simd_min(v); } else { r += simd_max(v); }
    out[thread_position_in_grid.x] = r;
    """
    out = np.array(emulate(_simd_demo(body))[0])
    assert (out[:32] == 31).all() and (out[32:] == 496).all()


@pytest.mark.parametrize("decls,fits", [
    ("threadgroup float a[8192];", True),                                  # exactly 32 KiB
    ("threadgroup float a[4096];\n    threadgroup float b[4097];", False),  # 4 bytes over
])
def test_threadgroup_memory_is_metals_32_kib(decls, fits):
    body = f"""
    {decls}
    a[thread_position_in_grid.x] = 1.0f;
    out[thread_position_in_grid.x] = a[thread_position_in_grid.x];
    """
    launch = _simd_demo(body)
    if fits:
        assert (np.array(emulate(launch)[0]) == 1).all()
    else:
        with pytest.raises(EmulationError, match="32 KiB.*32772 bytes"):
            emulate(launch)


def test_early_return_before_barrier_is_an_error():
    case = _attention_case()
    launch = mutate(plan_paged_attention(**case, num_splits=1),
                    "threadgroup float tg_m[NSG * G];",
                    "if (sg == 1) { return; }\nthreadgroup float tg_m[NSG * G];")
    with pytest.raises(EmulationError, match="barrier"):
        emulate(launch)


def test_out_of_bounds_read_is_an_error_not_a_crash():
    """Reading just past the end of a device buffer lands in its guard page: a fault.

    (A far offset would not do: it can land in memory the process has mapped elsewhere.)
    """
    case = _attention_case()
    end = case["k_pool"].size  # the first element past the buffer
    launch = mutate(plan_paged_attention(**case, num_splits=1),
                    "k[i] = float(k_pool[row + i]);", f"k[i] = float(k_pool[{end} + i]);")
    with pytest.raises(EmulationError, match="fault"):
        emulate(launch)


def test_hadamard_barrier_mutation_in_header_is_caught():
    rng = np.random.default_rng(0)
    o_part = mx.array(rng.standard_normal((2, 3, 4, 128)).astype(np.float32))
    lse = mx.array(rng.standard_normal((2, 3, 4)).astype(np.float32))
    signs = mx.array(rng.choice([-1.0, 1.0], 128).astype(np.float32))
    kw = dict(o_part=o_part, lse_part=lse, dtype=mx.float32, signs=signs)
    ref = paged_attention_combine_ref(**kw)
    good = plan_paged_attention_combine(**kw)
    assert max_err(emulate(good)[0], ref) < 1e-5
    stage = "half *= 2) {\n    threadgroup_barrier(mem_flags::mem_threadgroup);"
    bad = mutate(good, stage, "half *= 2) {", in_header=True)
    assert not max_err(emulate(bad)[0], ref) < 1e-3


def test_split_path_uses_the_combine_kernel():
    case = _attention_case()
    calls = []

    def spy(launch):
        calls.append(launch.spec.name)
        return emulate(launch)

    out = paged_attention_kernel(**case, num_splits=3, executor=spy)
    assert calls == ["mlxkv_paged_attention", "mlxkv_paged_attention_combine"]
    assert max_err(out, paged_attention_ref(**case)) < 2e-5


def _quant_plan():
    from test_paged_attention_quant import make_quant_case

    case = make_quant_case("e8m4", "int4", seq_lens=[37, 5], kvh=2, gqa=3, D=128, BS=16)
    return plan_paged_attention_quant(**case, num_splits=2)[0]


def _combine_plan():
    rng = np.random.default_rng(1)
    o_part = mx.array(rng.standard_normal((2, 3, 4, 128)).astype(np.float32))
    lse = mx.array(rng.standard_normal((2, 3, 4)).astype(np.float32))
    signs = mx.array(rng.choice([-1.0, 1.0], 128).astype(np.float32))
    return plan_paged_attention_combine(o_part=o_part, lse_part=lse, dtype=mx.float32,
                                        signs=signs)


def _encode_plan():
    x = mx.array(np.random.default_rng(2).standard_normal((6, 128)), mx.float32)
    return plan_kv_encode(x=x, codec=get_codec("d4m3", seed=0))


def _is_schedule_independent(launch, num_seeds=6) -> bool:
    runs = [[np.array(o) for o in emulate(launch, seed=seed)] for seed in range(num_seeds)]
    return all(np.array_equal(a, b, equal_nan=True)
               for run in runs[1:] for a, b in zip(runs[0], run, strict=True))


@pytest.mark.parametrize("make_plan", [
    lambda: plan_paged_attention(**_attention_case(), num_splits=2),
    _quant_plan, _combine_plan, _encode_plan,
], ids=["attention", "quant", "combine", "encode"])
def test_outputs_do_not_depend_on_the_thread_schedule(make_plan):
    """Every kernel is bit-for-bit the same under any interleaving (no data race)."""
    assert _is_schedule_independent(make_plan())


def test_missing_barrier_makes_outputs_schedule_dependent():
    """Planted race: without the barrier after the RMS partials, which partials a thread
    sees (written, or still poisoned) depends on the interleaving, i.e. on the seed."""
    bad = mutate(_encode_plan(), "}\nthreadgroup_barrier(mem_flags::mem_threadgroup);\ny[d] = yd;",
                 "}\ny[d] = yd;")
    assert not _is_schedule_independent(bad)
