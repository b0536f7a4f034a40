"""Capacity at a fixed KV memory budget: concurrent sequences without preemption, fp16 vs codec.

For each codec the engine is built with the same KV budget (`memory_budget_bytes`, the
pool planner sizes the blocks), then `admitted + 1` requests of `seq_len` tokens each
(prompt: the first half, random distinct ids; then ignore_eos decoding of the second half)
are submitted at once, where `admitted` = the pool's blocks / blocks per sequence. The run
records the peak number of running sequences, whether any was preempted, and the decode
tokens/s of the step loop (each sequence in its own prefill, then all decoding together).
A second run with exactly `admitted` requests must see no preemption.

The default is scaled down for a 2-core CPU: 256-token sequences in a 32 MiB budget hold
the same number of sequences as 2,048-token sequences in 256 MiB (block rounding aside).

    python benchmarks/capacity.py --codecs fp16 e8:k5v5
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from _common import RESULTS, bar_plot, header, print_header, write_json  # first: BLAS

import numpy as np  # noqa: E402

from mlxkv.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from mlxkv.engine import LLMEngine
from mlxkv.models.loader import load_model
from mlxkv.sampling import SamplingParams


def _engine(loaded, codec: str, budget: int, max_batched: int) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model=loaded.name),
        cache=CacheConfig(memory_budget_bytes=budget, kv_codec=codec,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=max_batched))
    return LLMEngine.from_config(config, loaded=loaded)


def _run(engine: LLMEngine, num: int, seq_len: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    half = seq_len // 2
    params = SamplingParams(max_tokens=seq_len - half, temperature=0.0, ignore_eos=True)
    for i in range(num):
        engine.add_request(f"r{i}", rng.integers(10, vocab - 10, size=half).tolist(), params)
    peak, generated, t_decode, t0 = 0, 0, 0.0, time.perf_counter()
    while engine.has_unfinished():
        decoding = not engine.scheduler.waiting
        t = time.perf_counter()
        outs = engine.step()
        if decoding:
            t_decode += time.perf_counter() - t
            generated += sum(len(o.new_token_ids) for o in outs)
        peak = max(peak, len(engine.scheduler.running))
    return {"requests": num, "peak_running": peak,
            "preemptions": engine.scheduler.num_preemptions,
            "decode_tok_s": generated / t_decode if t_decode else None,
            "wall_s": round(time.perf_counter() - t0, 1)}


def measure(loaded, codec: str, budget: int, seq_len: int, seed: int = 0,
            run: bool = True) -> dict:
    engine = _engine(loaded, codec, budget, max_batched=seq_len)
    groups = engine.store.groups
    bs = engine.store.block_size
    per_seq = []
    for spec, blocks in zip(groups, engine.store.num_blocks, strict=True):
        tokens = seq_len if spec.sliding_window is None else min(seq_len, spec.sliding_window)
        per_seq.append((blocks - 1) // (math.ceil(tokens / bs) + 1))
    admitted = min(per_seq)
    vocab = loaded.tokenizer.vocab_size
    row = {"codec": codec, "bytes_per_token": engine.store.bytes_per_token(),
           "pool_bytes": engine.store.nbytes, "admitted": admitted}
    if run:
        row["at_admitted"] = _run(engine, admitted, seq_len, vocab, seed)
        engine = _engine(loaded, codec, budget, max_batched=seq_len)
        row["at_admitted_plus_one"] = _run(engine, admitted + 1, seq_len, vocab, seed)
    print(f"{codec:>12}: {row['bytes_per_token']} B/token, admits {admitted}: "
          f"{row.get('at_admitted')}, +1: {row.get('at_admitted_plus_one')}", flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--codecs", nargs="+", default=["fp16", "e8:k5v5"])
    p.add_argument("--budget-mib", type=float, default=32.0)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tag", default="")
    p.add_argument("--quick", action="store_true", help="32-token sequences in 2 MiB")
    p.add_argument("--no-run", action="store_true",
                   help="only the planner's admission count (no engine steps)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.budget_mib, args.codecs = 32, 2.0, ["fp16", "int8"]
    loaded = load_model(args.model)
    budget = int(args.budget_mib * 2**20)
    h = header(loaded.name, "float32", {"budget_mib": args.budget_mib, "seq_len": args.seq_len,
                                        "engine_run": not args.no_run,
                                        "equivalent": f"{args.budget_mib * 2048 / args.seq_len:.0f}"
                                        " MiB at 2,048-token sequences", "prefix_caching": False})
    print_header(h)
    rows = [measure(loaded, c, budget, args.seq_len, run=not args.no_run) for c in args.codecs]
    base = rows[0]["admitted"]
    for r in rows:
        r["x_sequences_vs_first"] = r["admitted"] / base if base else None
    result = {**h, "rows": rows}
    write_json("capacity" + args.tag, result, args.out)
    panels = {"sequences admitted": {r["codec"]: r["admitted"] for r in rows}}
    if not args.no_run:
        panels["decode tok/s"] = {r["codec"]: r["at_admitted"]["decode_tok_s"] or 0 for r in rows}
    bar_plot(Path(args.out) / f"capacity{args.tag}.png", f"Sequences in {args.budget_mib} MiB of KV",
             panels)
    return result


if __name__ == "__main__":
    main()
