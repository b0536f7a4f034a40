"""small_m_linear (the compiled MLX primitive, mlxkv._ext) == x @ W.T (+ bias).

The reference is float64 numpy; the primitive must sit within the fp32 error bound of its
own summation order (8 lanes of K/8 sequential FMAs, a 3-level lane sum, the bias add),
and the bound is checked to be tight enough to catch one dropped K term. Skips only when
the extension was never built (a built extension that fails to load is a failure).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.kernels.linear_cpu import (
    MAX_ROWS,
    is_linear_kernel_available,
    kernel_applies,
    linear_cpu_kernel,
    linear_ref,
    small_m_linear,
)

if importlib.util.find_spec("mlxkv._ext") is None:
    if os.environ.get("CI"):  # CI's setup builds it: a failed build must not pass as a skip
        pytest.fail("mlxkv._ext not built: scripts/build_ext.sh failed in setup",
                    pytrace=False)
    pytest.skip("mlxkv._ext not built (scripts/build_ext.sh)", allow_module_level=True)

from mlxkv import _ext  # noqa: E402  (the raw primitive: no load-time smoke test in between)

EPS = float(np.finfo(np.float32).eps)
# (N, K): multiples of the 8-float vector and of the 3/4/8-row W blocks, and not
SHAPES = [(1, 1), (3, 5), (7, 13), (8, 8), (9, 17), (13, 31), (24, 40), (61, 67),
          (130, 576), (192, 64)]


def _case(m, n, k, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return x, w, b


def _reference(x, w, b):
    """(float64 x @ w.T + b, fp32 error bound of the primitive's summation order)."""
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        ref, mag = ref + b, mag + np.abs(b)
    k = x.shape[-1]
    return ref, (np.ceil(k / 8) + 8) * EPS * mag + 1e-30


def _within(got, x, w, b) -> bool:
    ref, bound = _reference(x, w, b)
    return bool(np.all(np.abs(np.asarray(got, dtype=np.float64) - ref) <= bound))


def _run(x, w, b, **kw):
    out = _ext.small_m_linear(mx.array(x), mx.array(w), None if b is None else mx.array(b), **kw)
    return np.array(out)


def test_extension_loads():
    assert is_linear_kernel_available()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_grid_matches_float64_within_the_fp32_bound(n, k, bias):
    for m in [*range(1, 17), 24, 31]:
        x, w, b = _case(m, n, k, bias, seed=1000 * m + n + k)
        got = _run(x, w, b)
        assert got.shape == (m, n)
        assert _within(got, x, w, b), f"M={m} N={n} K={k} bias={bias}"
        want = np.array(linear_ref(mx.array(x), mx.array(w), None if b is None else mx.array(b)))
        ref, bound = _reference(x, w, b)
        assert np.all(np.abs(got - want) <= 2 * bound), f"vs mx: M={m} N={n} K={k}"


@pytest.mark.parametrize("k", [1, 7, 13, 67, 576])
def test_the_bound_catches_one_dropped_k_term(k):
    """The tolerance is not loose: leaving out the last K term (a tail bug) breaks it."""
    x, w, b = _case(4, 40, k, True, seed=k)
    assert _within(_run(x, w, b), x, w, b)
    dropped = x[:, :-1].astype(np.float64) @ w[:, :-1].astype(np.float64).T + b
    assert not _within(dropped, x, w, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_rows_without_changing_a_bit(threads):
    """N split over the pool (odd N, chunk ends inside W blocks) gives the single-thread
    result bit for bit: each output is one tile's sum whatever thread runs it."""
    for m in (1, 2, 5, 16):
        x, w, b = _case(m, 8 * 301 + 5, 300, True, seed=m)
        one = _run(x, w, b, num_threads=1)
        assert np.array_equal(_run(x, w, b, num_threads=threads), one)
        assert np.array_equal(_run(x, w, b), one)
        assert _within(one, x, w, b)


def test_many_calls_in_one_graph_like_a_decode_step():
    """200 chained calls evaluated together (the pool serves them back to back)."""
    rng = np.random.default_rng(0)
    ws = [mx.array(rng.standard_normal((96, 96)).astype(np.float32) / 10) for _ in range(4)]
    x = mx.array(rng.standard_normal((3, 96)).astype(np.float32))
    got, want = x, x
    for i in range(200):
        got = mx.tanh(linear_cpu_kernel(got, ws[i % 4], num_threads=2))
        want = mx.tanh(linear_ref(want, ws[i % 4]))
    assert mx.allclose(got, want, atol=1e-4).item()


def test_strided_inputs_are_packed():
    rng = np.random.default_rng(3)
    base = mx.array(rng.standard_normal((40, 12)).astype(np.float32))
    w_t = mx.array(rng.standard_normal((40, 30)).astype(np.float32))
    b = mx.array(rng.standard_normal(60).astype(np.float32))[::2]  # strided bias
    cases = {
        "x transposed": (base.T, mx.array(rng.standard_normal((30, 40)).astype(np.float32))),
        "x every other row": (mx.array(rng.standard_normal((10, 40)).astype(np.float32))[::2],
                              w_t.T),
        "x broadcast": (mx.broadcast_to(base[:1], (5, 12)), w_t[:12].T),
        "W transposed": (base[:4], w_t[:12].T),
    }
    for what, (x, w) in cases.items():
        bias = b if w.shape[0] == 30 else None
        got = np.array(linear_cpu_kernel(x, w, bias))
        assert _within(got, np.array(x), np.array(w), None if bias is None else np.array(bias)), what


def test_leading_dims_and_empty_inputs():
    rng = np.random.default_rng(4)
    w = mx.array(rng.standard_normal((11, 9)).astype(np.float32))
    x = mx.array(rng.standard_normal((5, 1, 9)).astype(np.float32))  # the adapter's [T, 1, K]
    got = linear_cpu_kernel(x, w)
    assert got.shape == (5, 1, 11)
    assert mx.allclose(got, linear_ref(x, w), atol=1e-5).item()
    assert linear_cpu_kernel(mx.zeros((0, 9)), w).shape == (0, 11)
    b = mx.arange(3, dtype=mx.float32)
    assert mx.array_equal(linear_cpu_kernel(mx.zeros((2, 0)), mx.zeros((3, 0)), b),
                          mx.broadcast_to(b, (2, 3))).item()


@pytest.mark.parametrize("x,w,b,match", [
    (mx.zeros((2, 8)), mx.zeros((4, 7)), None, "K"),
    (mx.zeros((2, 8), mx.float16), mx.zeros((4, 8)), None, "float32"),
    (mx.zeros((2, 8)), mx.zeros((4, 8), mx.bfloat16), None, "float32"),
    (mx.zeros((2, 8)), mx.zeros((4, 8)), mx.zeros(5), "bias"),
    (mx.zeros((2, 8)), mx.zeros((1, 4, 8)), None, "weight"),
], ids=["k-mismatch", "fp16-x", "bf16-w", "bias-shape", "weight-rank"])
def test_bad_inputs_raise_value_error(x, w, b, match):
    with pytest.raises(ValueError, match=match):
        linear_cpu_kernel(x, w, b)


def test_dispatcher_uses_the_primitive_only_for_few_fp32_rows():
    w = mx.random.normal((24, 40))
    few, many = mx.random.normal((MAX_ROWS, 40)), mx.random.normal((MAX_ROWS + 1, 40))
    assert kernel_applies(few, w, None) and not kernel_applies(many, w, None)
    assert not kernel_applies(few.astype(mx.float16), w.astype(mx.float16), None)
    assert mx.array_equal(small_m_linear(few, w), linear_cpu_kernel(few, w)).item()
    assert mx.array_equal(small_m_linear(many, w), linear_ref(many, w)).item()


def test_portable_build_matches():
    """MLXKV_CPU_SIMD=0 forces the portable (no AVX2) build of the same tiles."""
    code = (
        "import mlxkv, mlx.core as mx, numpy as np, sys\n"
        "from mlxkv import _ext\n"
        "assert _ext.simd_level() == 0\n"
        "rng = np.random.default_rng(0)\n"
        "for m, n, k in [(1, 13, 31), (5, 61, 67), (16, 130, 576)]:\n"
        "    x = rng.standard_normal((m, k)).astype(np.float32)\n"
        "    w = rng.standard_normal((n, k)).astype(np.float32)\n"
        "    got = np.array(_ext.small_m_linear(mx.array(x), mx.array(w)))\n"
        "    ref = x.astype(np.float64) @ w.astype(np.float64).T\n"
        "    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T\n"
        "    assert np.all(np.abs(got - ref) <= (k / 8 + 9) * 1.2e-7 * mag), (m, n, k)\n"
        "print('ok')\n")
    env = {**os.environ, "MLXKV_CPU_SIMD": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
