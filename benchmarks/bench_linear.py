"""Linear microbenchmark: the compiled small-M linear vs MLX's matmul (OpenBLAS sgemm).

`y = x @ W.T` in fp32 for SmolLM2-135M's weight shapes (q/o 576x576, k/v 192x576,
gate/up 1536x576, down 576x1536, the tied lm_head 49152x576) and row counts M. Both sides
run interleaved in one process (round r times the primitive, then MLX, for every cell),
and each cell reports the minimum and the median over the rounds. A timed sample is
one call per weight of a set of distinct weights larger than the last-level cache,
evaluated together (what a decode step does: many linears in one graph, each streaming
its W from memory), so the figure is per call. The `floor` column is W's bytes over the measured
copy bandwidth (floor.py). Writes results/linear.json.

    python benchmarks/bench_linear.py [--quick] [--rows 1 4 8 16 32] [--rounds 15]
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import RESULTS, header, print_header, write_json  # BLAS first
from floor import bandwidth_gib_s

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxkv.kernels.linear_cpu import MAX_ROWS, linear_cpu_kernel, linear_ref  # noqa: E402

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576),
          "gate/up_proj": (1536, 576), "down_proj": (576, 1536), "lm_head": (49152, 576)}


def _sample(fn, xs, ws) -> float:
    """Seconds per call of fn over the (x, W) pairs, evaluated together."""
    t0 = time.perf_counter()
    mx.eval([fn(x, w) for x, w in zip(xs, ws, strict=True)])
    return (time.perf_counter() - t0) / len(xs)


def weights_for(n: int, k: int, stream_mib: int) -> list[mx.array]:
    """Enough distinct [n, k] weights to exceed `stream_mib` (more than the last-level
    cache), so every call streams its W from memory as a model's layers do."""
    count = max(1, -(-stream_mib * 2**20 // (n * k * 4)))
    rng = np.random.default_rng(n + k)
    base = rng.standard_normal((n, k)).astype(np.float32)
    ws = [mx.array(base) + i for i in range(count)]
    mx.eval(ws)
    return ws


def measure(ws: list[mx.array], m: int, rounds: int) -> dict:
    k = ws[0].shape[1]
    rng = np.random.default_rng(m)
    xs = [mx.array(rng.standard_normal((m, 1, k)).astype(np.float32)) for _ in ws]
    mx.eval(xs)
    sides = {"primitive": linear_cpu_kernel, "mlx": linear_ref}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up
        _sample(fn, xs, ws)
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(_sample(fn, xs, ws))
    return {name: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3}
            for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    rows = args.rows or ([1, 8] if args.quick else [1, 2, 4, 8, 12, 16, 24, 32, 64])
    rounds = args.rounds or (3 if args.quick else 15)
    shapes = {"q_proj/o_proj": SHAPES["q_proj/o_proj"]} if args.quick else SHAPES
    h = header("SmolLM2-135M shapes", "float32", {"rows": rows, "rounds": rounds,
                                                   "max_rows": MAX_ROWS})
    print_header(h)
    bw = bandwidth_gib_s(64 if args.quick else 256)
    print(f"# load average before: {os.getloadavg()}; copy bandwidth "
          f"{bw['floor_gib_s']:.1f} GiB/s")
    print("| shape | N x K | M | primitive min / med ms | mlx min / med ms | mlx / primitive "
          "(min) | W floor ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = []
    for name, (n, k) in shapes.items():
        floor_ms = n * k * 4 / (bw["floor_gib_s"] * 2**30) * 1e3
        ws = weights_for(n, k, 8 if args.quick else 96)
        for m in rows:
            t = measure(ws, m, rounds if len(ws) > 1 else max(3, rounds // 3))
            speedup = t["mlx"]["min_ms"] / t["primitive"]["min_ms"]
            results.append({"shape": name, "n": n, "k": k, "m": m, **t, "speedup": speedup,
                             "w_floor_ms": floor_ms})
            print(f"| {name} | {n}x{k} | {m} | {t['primitive']['min_ms']:.3f} / "
                  f"{t['primitive']['median_ms']:.3f} | {t['mlx']['min_ms']:.3f} / "
                  f"{t['mlx']['median_ms']:.3f} | {speedup:.2f}x | {floor_ms:.3f} |",
                  flush=True)
    del ws
    print(f"# load average after: {os.getloadavg()}")
    result = {**h, "bandwidth": bw, "load_average_after": os.getloadavg(), "rows": results}
    write_json("linear_quick" if args.quick else "linear", result, args.out)
    return result


if __name__ == "__main__":
    main()
