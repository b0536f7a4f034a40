"""Kernel microbenchmark: paged attention (full precision and compressed) and the KV encode.

Times the pure-mx reference paths on whatever device MLX uses (CPU here), the Metal
kernels when a Metal device exists, the compiled CPU primitive (mlxkv._ext) when built,
and mx.fast.scaled_dot_product_attention on contiguous K/V as the anchor. Each attention row also gives its bandwidth floor: the bytes of K/V
the op must read at least once divided by the measured copy bandwidth (the faster of
floor.py's MLX and numpy copy tests).
Prints hardware, settings and git revision; writes results/kernels.json and a PNG.
Medians of --repeats timed runs after one warm-up.

    python benchmarks/bench_kernels.py [--quick] [--contexts 512 2048] [--batch 1 8]
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import RESULTS, header, plot, print_header, write_json  # BLAS first
from floor import bandwidth_gib_s
from tqdm import tqdm

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxkv.codec import get_codec  # noqa: E402
from mlxkv.kernels import kv_encode_kernel, kv_encode_ref  # noqa: E402
from mlxkv.kernels._source import is_metal_available  # noqa: E402
from mlxkv.kernels.kv_encode_cpu import is_cpu_encode_available, kv_encode_cpu_kernel  # noqa: E402
from mlxkv.kernels.paged_attention import paged_attention_kernel, paged_attention_ref  # noqa: E402
from mlxkv.kernels.paged_attention_cpu import (  # noqa: E402
    is_cpu_kernel_available,
    paged_attention_cpu_kernel,
    paged_attention_quant_cpu_kernel,
)
from mlxkv.kernels.paged_attention_quant import (  # noqa: E402
    paged_attention_quant_kernel,
    paged_attention_quant_ref,
)


def _median_ms(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _case(batch, context, kvh, gqa, head_dim, block_size, seed=0):
    rng = np.random.default_rng(seed)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq + 1
    table = (1 + rng.permutation(num_blocks - 1)).reshape(batch, per_seq).astype(np.int32)
    shape = (num_blocks, block_size, kvh, head_dim)
    return dict(
        queries=mx.array(rng.standard_normal((batch, kvh * gqa, head_dim)).astype(np.float32)),
        k_pool=mx.array(rng.standard_normal(shape).astype(np.float32)),
        v_pool=mx.array(rng.standard_normal(shape).astype(np.float32)),
        block_tables=mx.array(table), seq_lens=mx.full((batch,), context, dtype=mx.int32),
        scale=head_dim**-0.5)


def _sdpa_fn(case, gqa):
    B, H, D = case["queries"].shape
    table = case["block_tables"]
    # A dense [B, KVH, L, D] cache, as mlx-lm keeps it (contiguous: no strided view).
    k = mx.contiguous(case["k_pool"][table].reshape(B, -1, H // gqa, D).transpose(0, 2, 1, 3))
    v = mx.contiguous(case["v_pool"][table].reshape(B, -1, H // gqa, D).transpose(0, 2, 1, 3))
    mx.eval(k, v)
    q = case["queries"][:, :, None]
    return lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=case["scale"])


def _kv_bytes(pools, table) -> int:
    """Bytes of the pool rows the tables reference (what attention must read once)."""
    used = int(table.size)
    return sum(int(a.nbytes) // a.shape[0] * used for pool in pools for a in pool.values())


def bench_attention(batch, context, args, metal: bool) -> list[dict]:
    case = _case(batch, context, args.kv_heads, args.gqa, args.head_dim, args.block_size)
    fp_bytes = _kv_bytes([{"x": case["k_pool"]}, {"x": case["v_pool"]}], case["block_tables"])
    rows = [{"op": "sdpa_contiguous", "kv_bytes": fp_bytes,
             "ms": _median_ms(_sdpa_fn(case, args.gqa), args.repeats)},
            {"op": "paged_attention_ref", "kv_bytes": fp_bytes,
             "ms": _median_ms(lambda: paged_attention_ref(**case), args.repeats)}]
    if metal:
        rows.append({"op": "paged_attention_kernel", "kv_bytes": fp_bytes,
                     "ms": _median_ms(lambda: paged_attention_kernel(**case), args.repeats)})
    if is_cpu_kernel_available():
        rows.append({"op": "paged_attention_cpu_kernel", "kv_bytes": fp_bytes,
                     "ms": _median_ms(lambda: paged_attention_cpu_kernel(**case), args.repeats)})
    k_fp, v_fp = case.pop("k_pool"), case.pop("v_pool")
    for spec in args.codecs:
        k_name, v_name = spec.split("/")
        kc, vc = get_codec(k_name, seed=0), get_codec(v_name, seed=1)
        qcase = dict(case, k_pool=kc.encode(k_fp), v_pool=vc.encode(v_fp), k_codec=kc,
                     v_codec=vc)
        mx.eval(qcase["k_pool"], qcase["v_pool"])
        q_bytes = _kv_bytes([qcase["k_pool"], qcase["v_pool"]], case["block_tables"])
        rows.append({"op": f"paged_attention_quant_ref[{spec}]", "kv_bytes": q_bytes,
                     "ms": _median_ms(lambda q=qcase: paged_attention_quant_ref(**q),
                                      args.repeats)})
        if is_cpu_kernel_available():
            rows.append({"op": f"paged_attention_quant_cpu_kernel[{spec}]", "kv_bytes": q_bytes,
                         "ms": _median_ms(lambda q=qcase: paged_attention_quant_cpu_kernel(**q),
                                          args.repeats)})
        if metal:
            rows.append({"op": f"paged_attention_quant_kernel[{spec}]", "kv_bytes": q_bytes,
                         "ms": _median_ms(lambda q=qcase: paged_attention_quant_kernel(**q),
                                          args.repeats)})
    for row in rows:
        row.update(batch=batch, context=context)
    return rows


def bench_encode(tokens, args, metal: bool) -> list[dict]:
    x = mx.array(np.random.default_rng(1).standard_normal(
        (tokens, args.kv_heads, args.head_dim)).astype(np.float32))
    rows = []
    for name in ("e8m4", "e8m3", "d4m3"):
        codec = get_codec(name, seed=0)
        rows.append({"op": f"kv_encode_ref[{name}]",
                     "ms": _median_ms(lambda c=codec: kv_encode_ref(x=x, codec=c), args.repeats)})
        if metal:
            rows.append({"op": f"kv_encode_kernel[{name}]",
                         "ms": _median_ms(lambda c=codec: kv_encode_kernel(x=x, codec=c),
                                          args.repeats)})
        if is_cpu_encode_available():
            rows.append({"op": f"kv_encode_cpu_kernel[{name}]",
                         "ms": _median_ms(lambda c=codec: kv_encode_cpu_kernel(x=x, codec=c),
                                          args.repeats)})
    for row in rows:
        row.update(tokens=tokens)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats (CI smoke)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--gqa", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--codecs", nargs="+", default=["int4/int4", "e8m4/e8m3"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batch, args.repeats, args.kv_heads = [256], [2], 3, 2
    metal = is_metal_available()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["metal_kernels_timed"] = metal
    h = header("none (synthetic KV)", "float32", settings)
    print_header(h)
    if not metal:
        print("# no Metal device: only reference paths and mx.fast SDPA are timed")
    bw = bandwidth_gib_s(64 if args.quick else 512)
    print(f"# measured copy bandwidth: MLX {bw['mlx_gib_s']:.1f} GiB/s, numpy "
          f"{bw['numpy_gib_s']:.1f} GiB/s (the floor uses the faster)")
    rows = []
    cells = [(b, c) for b in args.batch for c in args.contexts]
    for batch, context in tqdm(cells, desc="attention"):
        rows += bench_attention(batch, context, args, metal)
    rows += bench_encode(max(args.batch) * 64, args, metal)
    for row in rows:
        if "kv_bytes" in row:
            row["floor_ms"] = row["kv_bytes"] / (bw["floor_gib_s"] * 2**30) * 1e3
        where = (f"B={row['batch']:<3} L={row['context']:<6}" if "batch" in row
                 else f"T={row['tokens']:<10}")
        floor = f"  floor {row['floor_ms']:8.3f} ms" if "floor_ms" in row else ""
        print(f"{where} {row['op']:<44} {row['ms']:9.3f} ms{floor}")
    payload = {**h, "bandwidth": bw, "rows": rows}
    tag = "kernels_quick" if args.quick else "kernels"
    write_json(tag, payload, args.out)
    _plot(Path(args.out) / f"{tag}.png", rows, args)
    return payload


def _plot(path: Path, rows: list[dict], args) -> None:
    """ms per op against context (log-log), one line per (op, batch)."""
    series = {}
    for batch in args.batch:
        for op in dict.fromkeys(r["op"] for r in rows if r.get("batch") == batch):
            pts = [(r["context"], r["ms"]) for r in rows if r.get("batch") == batch
                   and r["op"] == op]
            series[f"{op} B={batch}"] = ([x for x, _ in pts], [y for _, y in pts])
    plot(path, "Decode attention, one layer (CPU)", "context", "ms", series,
         log=True)


if __name__ == "__main__":
    main()
