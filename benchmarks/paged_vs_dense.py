"""Paged vs dense decode: model-level decode step time at batch 1 and 8 across contexts.

Dense: mlx-lm's model with its own contiguous KVCache, batch B, one token per step (model
call + argmax). Paged: one mlxkv engine step (scheduling, attention, sampling) with B
running sequences of the same context, with the engine's decode attention ("auto": the
Metal kernels, or the compiled CPU primitive mlxkv._ext when built) and forced onto the
reference gather path; optionally also with compressed pools (`--codecs e8:k4v4 int8`).
Every round times one step of each side in turn (interleaved, so load on the machine hits
all sides alike); the median of `--rounds` rounds is reported; tokens/s = B / step. A paged
side's time includes draining its step (`mx.synchronize()`): the engine returns from step()
with the step still evaluating, which would otherwise run in the next side's interval (it
did until #14, charging each side for the one timed before it). So this is one step's full
latency; the overlap of consecutive steps (pipelining) is bench_throughput's to show.

The K/V of the context is not computed by a real prefill unless `--fill prefill`: the
pools (and the dense cache) hold zeros, since a decode step costs the same whatever the
values are, and prefilling 8 x 4096 tokens would take most of the run on a small CPU.

    python benchmarks/paged_vs_dense.py --model smollm2-135m-instruct
    python benchmarks/paged_vs_dense.py --model smollm2-135m-instruct --batches 8 \\
        --contexts 2048 --codecs e8:k4v4 int8
    python benchmarks/paged_vs_dense.py --quick
    python benchmarks/paged_vs_dense.py --codecs e8:k4v4 --batches 1 8 --mx-encode  # issue #14
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

from _common import RESULTS, header, load_model_for, plot, print_header, write_json  # BLAS 1st
from floor import start_decode, stop_decode
from tqdm import tqdm

import mlx.core as mx  # noqa: E402, I001


class DenseDecode:
    """mlx-lm decode at batch B over a contiguous cache of `context` tokens."""

    def __init__(self, model, batch: int, context: int, fill: str):
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.cache = model, make_prompt_cache(model)
        vocab = min(model.model.embed_tokens.weight.shape[0], 20000)
        if fill == "prefill":
            x = mx.random.randint(10, vocab, (batch, context))
            mx.eval(model(x, cache=self.cache))
        else:  # one real token sizes the cache, then zeros fill it to `context`
            mx.eval(model(mx.zeros((batch, 1), dtype=mx.int32), cache=self.cache))
            for c in self.cache:
                _, kvh, _, d = c.keys.shape
                z = mx.zeros((batch, kvh, context - 1, d), dtype=c.keys.dtype)
                c.update_and_fetch(z, z)
        mx.eval([c.state for c in self.cache])
        self.tok = mx.zeros((batch, 1), dtype=mx.int32)

    def step(self) -> None:
        logits = self.model(self.tok, cache=self.cache)
        self.tok = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(self.tok)


def _fresh() -> None:
    """Drop freed buffers between measurements (a cell must not pay for the last one's)."""
    gc.collect()
    mx.clear_cache()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_llm(loaded, codec: str, tokens: int):
    from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlxkv.llm import LLM

    blocks = tokens // 16 + 64
    return LLM(EngineConfig(cache=CacheConfig(num_blocks=blocks, kv_codec=codec),
                            scheduler=SchedulerConfig(max_num_batched_tokens=4096)),
               loaded=loaded)


def measure_cell(model, engines: dict, batch: int, context: int, fill: str,
                 rounds: int) -> dict[str, float]:
    """Median step seconds per side: 'dense', then one per engine variant, interleaved."""
    from mlxkv.attention import default_decode_op

    _fresh()
    dense = DenseDecode(model, batch, context, fill)
    sides = {"dense": dense.step}
    llms = list({id(llm): llm for llm, _ in engines.values()}.values())
    for llm in llms:
        start_decode(llm, batch, context, fill)
    for name, (llm, op) in engines.items():

        def step(llm=llm, op=op):
            llm.engine.runner.decode_op = op
            llm.engine.step()
            # engine.step() returns with its step still evaluating (async_eval, pipelining):
            # drain it inside this side's interval, or it runs in the next side's.
            mx.synchronize()
        sides[name] = step
    for fn in sides.values():  # warm-up
        fn()
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(_timed(fn))
    for llm in llms:
        llm.engine.runner.decode_op = default_decode_op("auto")
        stop_decode(llm, batch)
    del dense
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--codecs", nargs="*", default=[],
                   help="extra paged variants with compressed pools, e.g. e8:k4v4 int8")
    p.add_argument("--fill", choices=("zeros", "prefill"), default="zeros")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the paged reference-path side")
    p.add_argument("--mx-encode", action="store_true",
                   help="also run each --codecs variant with the pure-mx encoder + scatter "
                        "instead of the compiled write path (before/after in one run)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    batches = args.batches or [1, 8]
    contexts = args.contexts or ([16, 32] if args.quick else [256, 512, 1024, 2048, 4096])
    loaded, name = load_model_for(args)
    from mlxkv.attention import default_decode_op

    tokens = max(batches) * (max(contexts) + args.rounds + 8)
    base = make_llm(loaded, "auto", tokens)
    auto_op = base.engine.runner.decode_op
    auto_name = base.engine.kernels.report()["backend"]  # the op is the engine's KernelGuard
    engines = {"paged": (base, auto_op)}
    if not args.no_reference:
        engines["paged_ref"] = (base, default_decode_op("reference"))
    variants = []
    for codec in args.codecs:
        llm = make_llm(loaded, codec, tokens)
        engines[f"paged[{codec}]"] = (llm, llm.engine.runner.decode_op)
        variants.append(codec)
        if args.mx_encode:
            llm = make_llm(loaded, codec, tokens)
            llm.engine.store.writer = None  # KVStore.write: codec.encode + scatter
            engines[f"paged[{codec} mx-encode]"] = (llm, llm.engine.runner.decode_op)
            variants.append(f"{codec} mx-encode")
    h = header(name, "float32", {"batches": batches, "contexts": contexts,
                                 "auto_attention": auto_name, "codecs": variants,
                                 "fill": args.fill, "rounds": args.rounds})
    print_header(h)
    rows = []
    for b in batches:
        for ctx in tqdm(contexts, desc=f"batch {b}"):
            t = measure_cell(base.engine.runner.model, engines, b, ctx, args.fill, args.rounds)
            row = {"batch": b, "context": ctx, "dense_tok_s": b / t["dense"],
                   "paged_tok_s": b / t["paged"], "ratio": t["dense"] / t["paged"]}
            if "paged_ref" in t:
                row.update(paged_ref_tok_s=b / t["paged_ref"], ref_ratio=t["dense"] / t["paged_ref"])
            row["codecs"] = {c: {"tok_s": b / t[f"paged[{c}]"],
                                 "vs_fp": t["paged"] / t[f"paged[{c}]"],
                                 "vs_dense": t["dense"] / t[f"paged[{c}]"]} for c in variants}
            rows.append(row)
            extra = "".join(f" | {c} {v['vs_fp']:.2f}x of fp pool"
                            for c, v in row["codecs"].items())
            ref = f" (reference {row['ref_ratio']:.2f})" if "ref_ratio" in row else ""
            tqdm.write(f"batch {b:>2} ctx {ctx:>5}: paged[{auto_name}] {b / t['paged']:7.1f} "
                       f"tok/s | dense {b / t['dense']:7.1f} | paged/dense {row['ratio']:.2f}"
                       f"{ref}{extra}")
    result = {**h, "rows": rows}
    tag = "paged_vs_dense_quick" if args.quick else "paged_vs_dense"
    write_json(tag, result, args.out)
    series = {}
    for b in batches:
        sel = [r for r in rows if r["batch"] == b]
        series[f"paged b={b}"] = ([r["context"] for r in sel], [r["paged_tok_s"] for r in sel])
        series[f"dense b={b}"] = ([r["context"] for r in sel], [r["dense_tok_s"] for r in sel])
        for c in variants:
            series[f"paged {c} b={b}"] = ([r["context"] for r in sel],
                                          [r["codecs"][c]["tok_s"] for r in sel])
    plot(Path(args.out) / f"{tag}.png", f"Decode tok/s, {name}", "context", "tokens/s", series)
    return result


if __name__ == "__main__":
    main()
