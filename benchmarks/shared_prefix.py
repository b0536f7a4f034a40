"""Shared prefix: N requests that share a long prefix (a system prompt / document).

mlxkv: the leader computes the prefix once; followers hit the prefix cache and share its
blocks (zero copy). mlx-lm: each request holds its own KV cache of the whole prompt (what
`make_prompt_cache` + a per-request cache gives, and what a prompt cache keeps per entry).
Reported: KV bytes held while all N requests are live, prefill tokens computed, and the
time to first token of the cold leader vs the followers.

    python benchmarks/shared_prefix.py                 # SmolLM2, 8 x 1024-token prefix
    python benchmarks/shared_prefix.py --quick
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from _common import (  # BLAS first
    RESULTS, bar_plot, header, load_model_for, print_header, write_json)
from tqdm import tqdm

import mlx.core as mx  # noqa: E402, I001


def mlx_lm_side(model, prompts: list[list[int]]) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    caches, ttfts = [], []
    for p in prompts:
        start = time.perf_counter()
        cache = make_prompt_cache(model)
        logits = model(mx.array(p)[None], cache=cache)[:, -1]
        mx.eval(logits, [c.state for c in cache])
        ttfts.append(time.perf_counter() - start)
        caches.append(cache)
    nbytes = sum(c.nbytes for cache in caches for c in cache)
    return {"kv_bytes_held": nbytes, "prefill_tokens": sum(len(p) for p in prompts),
            "ttft_first_s": ttfts[0], "ttft_followers_median_s": statistics.median(ttfts[1:])}


def mlxkv_side(llm, prompts: list[list[int]]) -> dict:
    from mlxkv.sampling import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttfts, cached = [], []
    # Keep every request alive after its first token (max_tokens large, aborted at the end),
    # so the bytes are measured with all N requests holding their blocks.
    hold = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"r{i}", p, hold)
        while True:
            outs = [o for o in engine.step() if o.request_id == f"r{i}"]
            if outs:
                break
        ttfts.append(time.perf_counter() - start)
        cached.append(outs[0].num_cached_tokens)
    stats = engine.cache_stats()
    for i in range(len(prompts)):
        engine.abort(f"r{i}")
    del params
    return {"kv_bytes_held": stats["bytes_used"], "blocks_used": stats["blocks_used"],
            "prefill_tokens": sum(len(p) for p in prompts) - sum(cached),
            "cached_tokens": cached, "ttft_first_s": ttfts[0],
            "ttft_followers_median_s": statistics.median(ttfts[1:])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=None)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    prefix_len = args.prefix_len or (64 if args.quick else 1024)
    loaded, name = load_model_for(args)
    from mlxkv.config import CacheConfig, EngineConfig
    from mlxkv.llm import LLM

    llm = LLM(EngineConfig(cache=CacheConfig()), loaded=loaded)
    model = llm.engine.runner.model
    vocab = min(model.model.embed_tokens.weight.shape[0], 20000)
    rng = random.Random(0)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(10, vocab) for _ in range(args.suffix_len)]
               for _ in range(args.requests)]
    h = header(name, "float32", {"requests": args.requests, "prefix_len": prefix_len,
                                 "suffix_len": args.suffix_len, "block_size": 16})
    print_header(h)
    sides = {}
    for side in tqdm(["mlxkv", "mlx-lm"], desc="sides"):
        sides[side] = mlxkv_side(llm, prompts) if side == "mlxkv" else mlx_lm_side(model, prompts)
    ours, theirs = sides["mlxkv"], sides["mlx-lm"]
    for label, r in (("mlxkv", ours), ("mlx-lm", theirs)):
        print(f"{label:>7}: KV held {r['kv_bytes_held'] / 2**20:8.1f} MiB | prefill tokens "
              f"{r['prefill_tokens']:6d} | TTFT leader {r['ttft_first_s'] * 1e3:7.0f} ms, "
              f"followers (median) {r['ttft_followers_median_s'] * 1e3:7.0f} ms")
    result = {**h, "mlxkv": ours, "mlx_lm": theirs,
              "kv_bytes_ratio": theirs["kv_bytes_held"] / max(1, ours["kv_bytes_held"])}
    tag = "shared_prefix_quick" if args.quick else "shared_prefix"
    write_json(tag, result, args.out)
    panels = {
        "KV held (MiB)": {k: v["kv_bytes_held"] / 2**20 for k, v in sides.items()},
        "prefill tokens": {k: v["prefill_tokens"] for k, v in sides.items()},
        "follower TTFT median (ms)": {k: v["ttft_followers_median_s"] * 1e3
                                      for k, v in sides.items()},
    }
    bar_plot(Path(args.out) / f"{tag}.png",
             f"{args.requests} requests sharing a {prefix_len}-token prefix, {name}", panels)
    return result


if __name__ == "__main__":
    main()
