"""Shared prefix: N requests that share a long prefix (a system prompt / document).

Both sides reuse the prefix; requests arrive one after another, each asks for one token.
Both sides are warmed up first; each repeat uses a fresh prefix and alternates the order.

mlxkv: the leader computes the prefix once; followers hit the prefix cache and share its
blocks (zero copy). Requests stay live (they keep decoding) until all N have their first
token; bytes are counted then.

mlx-lm: its server's single-request path over `LRUPromptCache` (default size 10, as
`mlx_lm.server --prompt-cache-size`): fetch the nearest cached prompt (a deep copy, trimmed
to the common prefix), run only the rest through `generate_step`, store prompt + generated
token back. Bytes are counted over the entries the prompt cache holds after N requests:
each is a private copy of its prompt's KV.

Headline bytes on both sides: distinct tokens whose KV is stored x bytes per token (same
dtype). Overheads are reported apart: mlx-lm's KVCache buffers grow in 256-token steps
(capacity beyond the stored tokens); mlxkv's partly filled tail blocks, and the rest of
its preallocated pool. Prefill tokens computed and TTFT are measured as before.

    python benchmarks/shared_prefix.py --model smollm2-135m-instruct   # 8 x 1024-token prefix
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

MODEL_KEY = "bench"  # LRUPromptCache keys entries by (model, tokens); one model here


def _ttft_summary(ttfts: list[float], cached: list[int], prompts: list[list[int]]) -> dict:
    return {"prefill_tokens": sum(len(p) for p in prompts) - sum(cached),
            "cached_tokens": cached, "ttft_s": ttfts, "ttft_first_s": ttfts[0],
            "ttft_followers_median_s": statistics.median(ttfts[1:])}


def _mlx_lm_bytes(caches: list[list]) -> dict:
    """Stored tokens (the cache offset) vs allocated buffer capacity, per layer."""
    stored = allocated = tokens = 0
    for cache in caches:
        tokens += cache[0].offset
        for c in cache:
            per_token = c.keys.nbytes // c.keys.shape[2] + c.values.nbytes // c.values.shape[2]
            stored += c.offset * per_token
            allocated += c.nbytes
    per_token = stored // max(1, tokens)
    return {"tokens_stored": tokens, "bytes_per_token": per_token, "kv_bytes_stored": stored,
            "kv_bytes_allocated": allocated,
            "overhead": {"padded_capacity_bytes": allocated - stored}}


def mlx_lm_side(model, prompts: list[list[int]], max_entries: int) -> dict:
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

    prompt_cache = LRUPromptCache(max_size=max_entries)
    inserted, ttfts, cached = [], [], []
    for p in tqdm(prompts, desc="mlx-lm requests", leave=False):
        start = time.perf_counter()
        cache, rest = prompt_cache.fetch_nearest_cache(MODEL_KEY, p)
        cache = cache if cache is not None else make_prompt_cache(model)
        key = list(p)
        for token, _ in generate_step(mx.array(rest), model, max_tokens=1, prompt_cache=cache):
            ttfts.append(time.perf_counter() - start)
            key.append(token)
        mx.eval([c.state for c in cache])
        prompt_cache.insert_cache(MODEL_KEY, key, cache)
        inserted.append(cache)
        cached.append(len(p) - len(rest))
    # NOTE: the LRU drops its oldest entries first; nothing here is a prefix of another
    # entry, so the held entries are the last len(prompt_cache) inserted.
    held = inserted[len(inserted) - len(prompt_cache):]
    out = _mlx_lm_bytes(held)
    assert out["kv_bytes_allocated"] == prompt_cache.nbytes, "entry bytes drifted"
    return {**out, "entries_held": len(held), "max_entries": max_entries,
            **_ttft_summary(ttfts, cached, prompts)}


def _mlxkv_bytes(engine, request_ids: list[str]) -> dict:
    """Distinct tokens held in the live requests' blocks; slack = used blocks' empty slots."""
    cm, store, bs = engine.cache, engine.store, engine.cache.block_size
    fill: dict[tuple[int, int], int] = {}  # (group, block_id) -> tokens written in it
    for rid in request_ids:
        num_tokens = cm.num_tokens(rid)
        for g, table in enumerate(cm.block_tables(rid)):
            for i, block_id in enumerate(table):
                if block_id:  # 0 is the null block (out of a sliding window)
                    n = min(bs, num_tokens - i * bs)
                    fill[g, block_id] = max(fill.get((g, block_id), 0), n)
    per_slot = [store.bytes_per_block(g) // bs for g in range(len(store.groups))]
    stored = sum(n * per_slot[g] for (g, _), n in fill.items())
    used = sum(bs * per_slot[g] for g, _ in fill)
    tokens = sum(n for (g, _), n in fill.items() if g == 0)
    return {"tokens_stored": tokens, "bytes_per_token": store.bytes_per_token(),
            "kv_bytes_stored": stored, "kv_bytes_allocated": used,
            "blocks_used": len(fill), "pool_bytes": store.nbytes,
            "overhead": {"block_slack_bytes": used - stored,
                         "unused_pool_bytes": store.nbytes - used}}


def mlxkv_side(llm, prompts: list[list[int]]) -> dict:
    from mlxkv.sampling import SamplingParams

    engine = llm.engine
    # Keep every request alive after its first token (max_tokens large, aborted at the end),
    # so the bytes are counted with all N requests holding their blocks.
    hold = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(prompts))]
    ttfts, cached = [], []
    for rid, p in tqdm(list(zip(ids, prompts, strict=True)), desc="mlxkv requests",
                       leave=False):
        start = time.perf_counter()
        engine.add_request(rid, p, hold)
        while not (outs := [o for o in engine.step() if o.request_id == rid]):
            pass
        ttfts.append(time.perf_counter() - start)
        cached.append(outs[0].num_cached_tokens)
    out = _mlxkv_bytes(engine, ids)
    assert out["blocks_used"] == engine.cache_stats()["blocks_used"], "stray blocks in use"
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():  # hand out the abort deltas now: the ids are reused
        engine.step()
    return {**out, **_ttft_summary(ttfts, cached, prompts)}


def _mib(x: int) -> float:
    return x / 2**20


def _print_side(label: str, r: dict) -> None:
    over = ", ".join(f"{k} {_mib(v):.1f} MiB" for k, v in r["overhead"].items())
    print(f"{label:>7}: {r['tokens_stored']:6d} tokens stored = {_mib(r['kv_bytes_stored']):7.1f}"
          f" MiB ({over}) | prefill tokens {r['prefill_tokens']:6d} | TTFT leader "
          f"{r['ttft_first_s'] * 1e3:7.0f} ms, followers (median) "
          f"{r['ttft_followers_median_s'] * 1e3:7.0f} ms")


def _plot(path: Path, title: str, sides: dict) -> None:
    panels = {
        "KV stored (MiB)": {k: _mib(v["kv_bytes_stored"]) for k, v in sides.items()},
        "stored + padding/slack (MiB)": {k: _mib(v["kv_bytes_allocated"])
                                         for k, v in sides.items()},
        "prefill tokens": {k: v["prefill_tokens"] for k, v in sides.items()},
        "follower TTFT median (ms)": {k: v["ttft_followers_median_s"] * 1e3
                                      for k, v in sides.items()},
    }
    bar_plot(path, title, panels)


def make_prompts(vocab: int, num_requests: int, prefix_len: int, suffix_len: int,
                 seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(suffix_len)]
            for _ in range(num_requests)]


def measure(runs: dict, vocab: int, args, prefix_len: int, repeats: int) -> dict:
    """Each repeat draws a fresh prefix and alternates which side goes first. Bytes and token
    counts come from the last repeat (they do not vary); TTFTs are medians over repeats."""
    per_side: dict[str, list[dict]] = {label: [] for label in runs}
    with tqdm(total=repeats * len(runs), desc="sides x repeats") as bar:
        for rep in range(repeats):
            prompts = make_prompts(vocab, args.requests, prefix_len, args.suffix_len, seed=rep)
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for label in order:
                per_side[label].append(runs[label](prompts))
                bar.update()
    sides = {}
    for label, reps in per_side.items():
        leaders = [r["ttft_first_s"] for r in reps]
        followers = [t for r in reps for t in r["ttft_s"][1:]]
        sides[label] = {**reps[-1], "ttft_s": [r["ttft_s"] for r in reps],
                        "ttft_first_s": statistics.median(leaders),
                        "ttft_followers_median_s": statistics.median(followers)}
    return sides


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=None)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--prompt-cache-size", type=int, default=10,
                   help="mlx-lm LRUPromptCache entries (mlx_lm.server's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="fresh-prefix repeats, sides alternating (default 3; 1 in --quick)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    prefix_len = args.prefix_len or (64 if args.quick else 1024)
    loaded, name = load_model_for(args)
    from mlxkv.config import CacheConfig, EngineConfig
    from mlxkv.llm import LLM

    llm = LLM(EngineConfig(cache=CacheConfig()), loaded=loaded)
    model = llm.engine.runner.model
    vocab = min(model.model.embed_tokens.weight.shape[0], 20000)
    repeats = args.repeats or (1 if args.quick else 3)
    h = header(name, "float32", {"requests": args.requests, "prefix_len": prefix_len,
                                 "suffix_len": args.suffix_len,
                                 "block_size": llm.engine.cache.block_size,
                                 "mlx_lm_prompt_cache_size": args.prompt_cache_size,
                                 "repeats": repeats})
    print_header(h)
    runs = {
        "mlxkv": lambda prompts: mlxkv_side(llm, prompts),
        "mlx-lm": lambda prompts: mlx_lm_side(model, prompts, args.prompt_cache_size),
    }
    warmup = make_prompts(vocab, 2, 32, 8, seed=10_000)
    for run in runs.values():  # first-call costs (allocation, thread start) fall on neither
        run(warmup)
    sides = measure(runs, vocab, args, prefix_len, repeats)
    ours, theirs = sides["mlxkv"], sides["mlx-lm"]
    for label, r in sides.items():
        _print_side(label, r)
    result = {**h, "mlxkv": ours, "mlx_lm": theirs,
              "kv_bytes_stored_ratio": theirs["kv_bytes_stored"] / max(1, ours["kv_bytes_stored"])}
    tag = "shared_prefix_quick" if args.quick else "shared_prefix"
    write_json(tag, result, args.out)
    _plot(Path(args.out) / f"{tag}.png",
          f"{args.requests} requests sharing a {prefix_len}-token prefix, {name}", sides)
    return result


if __name__ == "__main__":
    main()
