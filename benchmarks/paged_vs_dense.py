"""Paged vs dense decode: model-level decode step time at batch 1 and 8 across contexts.

Dense: mlx-lm's model with its own (contiguous) KVCache, batch B, one token per step.
Paged: one mlxkv engine step with B running sequences of the same context, once with the
engine's decode attention ("auto": Metal kernels, or the compiled CPU primitive mlxkv._ext
when built) and once forced onto the reference gather path. Median of 8 steps after
prefill; tokens/s = B / step.

    python benchmarks/paged_vs_dense.py                  # SmolLM2, contexts 512 1024 2048
    python benchmarks/paged_vs_dense.py --quick
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

from _common import RESULTS, header, load_model_for, plot, print_header, write_json  # BLAS 1st
from floor import step_time
from tqdm import tqdm

import mlx.core as mx  # noqa: E402, I001


def dense_step_time(model, batch: int, context: int) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    vocab = min(model.model.embed_tokens.weight.shape[0], 20000)
    cache = make_prompt_cache(model)
    x = mx.random.randint(10, vocab, (batch, context))
    mx.eval(model(x, cache=cache), [c.state for c in cache])
    tok = mx.zeros((batch, 1), dtype=mx.int32)
    times = []
    for _ in range(8):
        start = time.perf_counter()
        logits = model(tok, cache=cache)
        tok = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(tok)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fresh() -> None:
    """Drop freed buffers between measurements (a cell must not pay for the last one's)."""
    gc.collect()
    mx.clear_cache()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    batches = args.batches or [1, 8]
    contexts = args.contexts or ([16, 32] if args.quick else [512, 1024, 2048])
    loaded, name = load_model_for(args)
    from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlxkv.llm import LLM

    llm = LLM(EngineConfig(cache=CacheConfig(), scheduler=SchedulerConfig(
        max_num_batched_tokens=4096)), loaded=loaded)
    from mlxkv.attention import default_decode_op

    runner = llm.engine.runner
    model, auto_op = runner.model, runner.decode_op
    auto_name = getattr(auto_op, "__name__", "reference")
    h = header(name, "float32", {"batches": batches, "contexts": contexts,
                                 "auto_attention": auto_name})
    print_header(h)
    rows = []
    for b in batches:
        for ctx in tqdm(contexts, desc=f"batch {b}"):
            _fresh()
            paged = step_time(llm, b, ctx)
            runner.decode_op = default_decode_op("reference")
            _fresh()
            ref = step_time(llm, b, ctx)
            runner.decode_op = auto_op
            _fresh()
            dense = dense_step_time(model, b, ctx)
            rows.append({"batch": b, "context": ctx, "paged_tok_s": b / paged,
                         "paged_ref_tok_s": b / ref, "dense_tok_s": b / dense,
                         "ratio": dense / paged, "ref_ratio": dense / ref})
            tqdm.write(f"batch {b:>2} ctx {ctx:>5}: paged[{auto_name}] {b / paged:7.1f} tok/s | "
                       f"paged[reference] {b / ref:7.1f} | dense {b / dense:7.1f} | "
                       f"paged/dense {dense / paged:.2f} (reference {dense / ref:.2f})")
    result = {**h, "rows": rows}
    tag = "paged_vs_dense_quick" if args.quick else "paged_vs_dense"
    write_json(tag, result, args.out)
    series = {}
    for b in batches:
        sel = [r for r in rows if r["batch"] == b]
        series[f"paged b={b}"] = ([r["context"] for r in sel], [r["paged_tok_s"] for r in sel])
        series[f"dense b={b}"] = ([r["context"] for r in sel], [r["dense_tok_s"] for r in sel])
    plot(Path(args.out) / f"{tag}.png", f"Decode tok/s, {name}", "context", "tokens/s", series)
    return result


if __name__ == "__main__":
    main()
