"""Paged vs dense decode: model-level decode step time at batch 1 and 8 across contexts.

Dense: mlx-lm's model with its own contiguous KVCache, batch B, one token per step (model
call + argmax). Paged: one mlxkv engine step (scheduling, attention, sampling) with B
running sequences of the same context, with the engine's decode attention ("auto": the
Metal kernels, or the compiled CPU primitive mlxkv._ext when built) and forced onto the
reference gather path; optionally also with compressed pools (`--codecs e8:k4v4 int8`).
When the engine runs its linear layers through the compiled small-M linear (CPU), a
"paged, MLX matmul" side runs the same engine with MLX's matmul (MLXKV_LINEAR=reference);
dense mlx-lm always keeps MLX's matmul. Every round times one step of each side in turn
(interleaved, so load on the machine hits all sides alike; each side settled first, see
measure_cell); the median of `--rounds` rounds is reported; tokens/s = B / step.

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
    """Median step seconds per side: 'dense', then one per engine variant ({name: (llm,
    decode op[, module tree the runner runs])}). Sides take turns every round. Before
    each side MLX's queue is drained, and an engine side runs one untimed step after its
    variant is set: the engine pipelines, so a step's time is mostly the evaluation of the
    step launched before it (_common.engine_step_times); unsettled, a side would pay for
    its predecessor's step."""
    from mlxkv.attention import default_decode_op

    _fresh()
    dense = DenseDecode(model, batch, context, fill)
    llms = list({id(v[0]): v[0] for v in engines.values()}.values())
    configured = {id(llm): llm.engine.runner.net for llm in llms}
    for llm in llms:
        start_decode(llm, batch, context, fill)
    dense.step()  # warm-up
    times = {"dense": [], **{name: [] for name in engines}}
    for _ in range(rounds):
        mx.synchronize()
        times["dense"].append(_timed(dense.step))
        for name, (llm, op, *net) in engines.items():
            mx.synchronize()
            llm.engine.runner.decode_op = op
            llm.engine.runner.net = net[0] if net else configured[id(llm)]
            llm.engine.step()
            times[name].append(_timed(llm.engine.step))
    for llm in llms:
        llm.engine.runner.decode_op = default_decode_op("auto")
        llm.engine.runner.net = configured[id(llm)]
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

    tokens = max(batches) * (max(contexts) + 6 * args.rounds + 16)  # 2 steps per side, round
    base = make_llm(loaded, "auto", tokens)
    auto_op = base.engine.runner.decode_op
    auto_name = base.engine.cache_stats()["attention"]["backend"]  # e.g. cpu-ext
    runner = base.engine.runner  # linears routed through mlxkv._ext: also MLX's matmul
    mx_linear = {"paged_mx_linear": (base, auto_op, runner.model)} if (
        runner.net is not runner.model) else {}
    engines = {"paged": (base, auto_op), **mx_linear}
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
    h["settings"]["linear"] = base.engine.cache_stats()["linear"]["backend"]
    print(f"# linear layers: {h['settings']['linear']}")
    rows = []
    for b in batches:
        for ctx in tqdm(contexts, desc=f"batch {b}"):
            t = measure_cell(base.engine.runner.model, engines, b, ctx, args.fill, args.rounds)
            row = {"batch": b, "context": ctx, "dense_tok_s": b / t["dense"],
                   "paged_tok_s": b / t["paged"], "ratio": t["dense"] / t["paged"]}
            if "paged_mx_linear" in t:
                row.update(paged_mx_linear_tok_s=b / t["paged_mx_linear"],
                           mx_linear_ratio=t["dense"] / t["paged_mx_linear"])
            if "paged_ref" in t:
                row.update(paged_ref_tok_s=b / t["paged_ref"], ref_ratio=t["dense"] / t["paged_ref"])
            row["codecs"] = {c: {"tok_s": b / t[f"paged[{c}]"],
                                 "vs_fp": t["paged"] / t[f"paged[{c}]"],
                                 "vs_dense": t["dense"] / t[f"paged[{c}]"]} for c in variants}
            rows.append(row)
            extra = "".join(f" | {c} {v['vs_fp']:.2f}x of fp pool"
                            for c, v in row["codecs"].items())
            ref = f" (reference {row['ref_ratio']:.2f})" if "ref_ratio" in row else ""
            ref += (f" | paged, MLX matmul {row['paged_mx_linear_tok_s']:7.1f} tok/s, /dense "
                    f"{row['mx_linear_ratio']:.2f}") if "mx_linear_ratio" in row else ""
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
