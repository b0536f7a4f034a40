"""Physical floor of decode: measured step time vs (weight bytes + KV bytes read) / bandwidth.

Bandwidth is measured on this machine (an MLX copy of a 512 MiB array, and numpy's), then
one decode step of the engine at batch B and context L is timed and compared with the
time it takes just to stream the weights and the batch's KV once. When the engine runs its
linear layers through the compiled small-M linear (mlxkv._ext, CPU), the same steps are
also timed with MLX's matmul (MLXKV_LINEAR=reference), interleaved in blocks of steps, and
with zero-cost linears (every linear layer returns zeros without reading its weight: not a
valid forward, only the cost of the rest of the step; the zero K/V it writes change the
values the other sides read next, not their cost).

    python benchmarks/floor.py                    # SmolLM2, batch 1 and 8, context 512
    python benchmarks/floor.py --quick
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from _common import (  # BLAS first
    RESULTS, bar_plot, engine_step_times, header, linear_variants, load_model_for,
    print_header, write_json)
from tqdm import tqdm

import mlx.core as mx  # noqa: E402, I001
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def bandwidth_gib_s(num_mib: int) -> dict:
    a = mx.random.uniform(shape=(num_mib * 2**18,))
    mx.eval(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        b = a + 0  # reads and writes num_mib each
        mx.eval(b)
        times.append(time.perf_counter() - start)
        del b
    x = np.random.rand(num_mib * 2**17)
    np_times = []
    for _ in range(5):
        start = time.perf_counter()
        y = x.copy()
        np_times.append(time.perf_counter() - start)
        del y
    moved = 2 * num_mib / 1024
    mlx_bw, np_bw = moved / min(times), moved / min(np_times)
    # The floor must be a lower bound on time, so it uses the faster of the two copy tests.
    return {"mlx_gib_s": mlx_bw, "numpy_gib_s": np_bw, "floor_gib_s": max(mlx_bw, np_bw)}


def _zero_logits_forward(runner, vocab: int):
    """A stand-in for runner.forward that skips the model: zero logits, no KV writes."""
    def forward(batch):
        return mx.zeros((batch.logits_indices.shape[0], vocab), dtype=mx.float32)
    return forward


def start_decode(llm, batch: int, context: int, fill: str = "prefill") -> None:
    """Admit `batch` requests of `context` random tokens and run their prefill.

    fill="zeros" skips the model during prefill (the pools keep their zeros): a decode
    step costs the same whatever the K/V values are, and a real prefill of batch x context
    tokens would dominate the benchmark's time on a small CPU.
    """
    from mlxkv.sampling import SamplingParams

    engine = llm.engine
    vocab = engine.runner.model.model.embed_tokens.weight.shape[0]
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"f{i}", [rng.randrange(10, min(vocab, 20000))
                                     for _ in range(context)], params)
    real_forward = engine.runner.forward
    if fill == "zeros":
        engine.runner.forward = _zero_logits_forward(engine.runner, vocab)
    try:
        while any(r.num_computed_tokens < r.num_prompt_tokens
                  for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
    finally:
        engine.runner.forward = real_forward


def stop_decode(llm, batch: int) -> None:
    for i in range(batch):
        llm.engine.abort(f"f{i}")
    llm.engine.step()


def zero_linear_variant(llm):
    """apply() of a diagnostic side: the runner's linears return zeros at no cost."""
    from mlxkv.models.linear_seam import route_linears

    def zeros(x, w, b):  # still depends on x: MLX must not drop what computed x as dead
        return mx.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype) + x[..., :1] * 0

    net, _ = route_linears(llm.engine.runner.model, zeros, max_rows=1 << 30)
    return lambda: setattr(llm.engine.runner, "net", net)


def step_times(llm, batch: int, context: int, variants: dict, fill: str = "prefill",
               rounds: int = 8) -> dict[str, float]:
    """(median, min) engine decode step per variant at `batch` sequences of `context`
    tokens (`rounds` x 2 timed steps each, interleaved: _common.engine_step_times). On a
    shared machine the min is the better estimate of a side's own cost."""
    start_decode(llm, batch, context, fill)
    times = engine_step_times(llm.engine, variants, rounds)
    stop_decode(llm, batch)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    context = args.context or (32 if args.quick else 512)
    loaded, name = load_model_for(args)
    from mlxkv.config import CacheConfig, EngineConfig
    from mlxkv.llm import LLM

    llm = LLM(EngineConfig(cache=CacheConfig()), loaded=loaded)
    h = header(name, "float32", {"batches": batches, "context": context,
                                 "linear": llm.engine.cache_stats()["linear"]["backend"]})
    print_header(h)
    bw = bandwidth_gib_s(64 if args.quick else 512)
    weights = sum(v.nbytes for _, v in tree_flatten(llm.engine.runner.model.parameters()))
    kv_per_token = llm.engine.store.bytes_per_token()
    variants = {**linear_variants(llm), "_zero_linear": zero_linear_variant(llm)}
    rows = []
    for b in tqdm(batches, desc="batches"):
        ts = step_times(llm, b, context, variants, rounds=2 if args.quick else 8)
        t = ts[""][0]
        moved = weights + b * context * kv_per_token
        floor = moved / (bw["floor_gib_s"] * 2**30)
        row = {"batch": b, "context": context, "step_s": t, "bytes_per_step": moved,
               "floor_s": floor, "fraction_of_floor": floor / t}
        for name, (median, least) in ts.items():
            row[f"step{name}_s"], row[f"step{name}_min_s"] = median, least
        rows.append(row)
        sides = "; ".join(f"{name[1:] or 'step'} {med * 1e3:.1f} (min {least * 1e3:.1f}) ms"
                          for name, (med, least) in ts.items())
        tqdm.write(f"batch {b:>3}, context {context}: {sides}; floor {floor * 1e3:6.2f} ms "
                   f"(step / floor {t / floor:.2f}x, min {ts[''][1] / floor:.2f}x)")
    print(f"bandwidth: mlx {bw['mlx_gib_s']:.1f} GiB/s, numpy {bw['numpy_gib_s']:.1f} GiB/s; "
          f"weights {weights / 2**20:.0f} MiB, KV {kv_per_token} B/token")
    result = {**h, "bandwidth": bw, "weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
              "rows": rows}
    tag = "floor_quick" if args.quick else "floor"
    write_json(tag, result, args.out)
    bar_plot(Path(args.out) / f"{tag}.png", f"Decode step vs memory floor, {name}, "
             f"context {context}",
             {f"batch {r['batch']} (ms)": {
                 "step": r["step_s"] * 1e3,
                 **({"step, MLX matmul": r["step_mx_linear_s"] * 1e3}
                    if "step_mx_linear_s" in r else {}),
                 "floor": r["floor_s"] * 1e3} for r in rows})
    return result


if __name__ == "__main__":
    main()
