"""Kernel microbenchmark: paged attention (full precision and compressed) and the KV encode.

Times the pure-mx reference paths on whatever device MLX uses (CPU here), the Metal
kernels when a Metal device exists, and mx.fast.scaled_dot_product_attention on contiguous
K/V as the anchor. Prints hardware, settings and git revision; writes
results/kernels.json. Medians of --repeats timed runs after one warm-up.

    python benchmarks/bench_kernels.py [--quick] [--contexts 512 2048] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx  # noqa: E402  (after mlxkv via _common)
import numpy as np  # noqa: E402
from _common import header, print_header, write_json

from mlxkv.codec import get_codec  # noqa: E402
from mlxkv.kernels import kv_encode_kernel, kv_encode_ref  # noqa: E402
from mlxkv.kernels._source import is_metal_available  # noqa: E402
from mlxkv.kernels.paged_attention import paged_attention_kernel, paged_attention_ref  # noqa: E402
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
    k = case["k_pool"][table].reshape(B, -1, H // gqa, D).transpose(0, 2, 1, 3)
    v = case["v_pool"][table].reshape(B, -1, H // gqa, D).transpose(0, 2, 1, 3)
    mx.eval(k, v)
    q = case["queries"][:, :, None]
    return lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=case["scale"])


def bench_attention(batch, context, args, metal: bool) -> list[dict]:
    case = _case(batch, context, args.kv_heads, args.gqa, args.head_dim, args.block_size)
    rows = [{"op": "sdpa_contiguous", "ms": _median_ms(_sdpa_fn(case, args.gqa), args.repeats)},
            {"op": "paged_attention_ref",
             "ms": _median_ms(lambda: paged_attention_ref(**case), args.repeats)}]
    if metal:
        rows.append({"op": "paged_attention_kernel",
                     "ms": _median_ms(lambda: paged_attention_kernel(**case), args.repeats)})
    k_fp, v_fp = case.pop("k_pool"), case.pop("v_pool")
    for spec in args.codecs:
        k_name, v_name = spec.split("/")
        kc, vc = get_codec(k_name, seed=0), get_codec(v_name, seed=1)
        qcase = dict(case, k_pool=kc.encode(k_fp), v_pool=vc.encode(v_fp), k_codec=kc,
                     v_codec=vc)
        mx.eval(qcase["k_pool"], qcase["v_pool"])
        rows.append({"op": f"paged_attention_quant_ref[{spec}]",
                     "ms": _median_ms(lambda q=qcase: paged_attention_quant_ref(**q),
                                      args.repeats)})
        if metal:
            rows.append({"op": f"paged_attention_quant_kernel[{spec}]",
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
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batch, args.repeats, args.kv_heads = [256], [2], 3, 2
    metal = is_metal_available()
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    settings["metal_kernels_timed"] = metal
    h = header("none (synthetic KV)", "float32", settings)
    print_header(h)
    if not metal:
        print("# no Metal device: only reference paths and mx.fast SDPA are timed")
    rows = []
    for batch in args.batch:
        for context in args.contexts:
            rows += bench_attention(batch, context, args, metal)
    rows += bench_encode(max(args.batch) * 64, args, metal)
    for row in rows:
        where = (f"B={row['batch']:<3} L={row['context']:<6}" if "batch" in row
                 else f"T={row['tokens']:<10}")
        print(f"{where} {row['op']:<44} {row['ms']:9.3f} ms")
    payload = {"header": h, "rows": rows}
    write_json("kernels_quick" if args.quick else "kernels", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
