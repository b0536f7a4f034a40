"""Aggregate decode throughput at 1..32 concurrent requests: mlxkv engine vs mlx-lm BatchGenerator.

Same model, same seeded prompts, same output length (eos ignored), greedy, in one run.
Reported per concurrency: generated tokens / wall time from first insert to last token
(prefill included), the median over --repeats runs, and the ratio mlxkv / mlx-lm. With
one stream mlx-lm's best configuration is its single-sequence `generate_step` loop (the
one `mlx_lm.generate` runs, async_eval pipelined), measured as a third side. When the
engine runs its linear layers through the compiled small-M linear (CPU), the engine is
also run with MLX's matmul (MLXKV_LINEAR=reference; mlx-lm always has MLX's matmul).

    python benchmarks/bench_throughput.py                 # SmolLM2, 1 4 8 16 32
    python benchmarks/bench_throughput.py --quick         # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from _common import RESULTS, header, linear_variants, load_model_for, plot, print_header, write_json
from tqdm import tqdm


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 20000)) for _ in range(length)] for _ in range(num)]


def run_mlxkv(llm, prompts, max_tokens: int) -> tuple[float, int]:
    from mlxkv.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.engine.cache.evict_all_cached()  # no prefix hits across repeats
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o["token_ids"]) for o in outs)


def run_mlx_lm(model, prompts, max_tokens: int) -> tuple[float, int]:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[],
                         completion_batch_size=max(32, len(prompts)),
                         prefill_batch_size=min(8, len(prompts)))
    start = time.perf_counter()
    gen.insert(prompts, [max_tokens] * len(prompts))
    count = 0
    while responses := gen.next_generated():
        count += sum(1 for r in responses if r.token is not None)
    elapsed = time.perf_counter() - start
    gen.close()
    return elapsed, count


def run_mlx_lm_generate(model, prompt, max_tokens: int) -> tuple[float, int]:
    """mlx-lm's single-stream path: generate_step (greedy, no EOS check)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    count = sum(1 for _ in zip(range(max_tokens),
                               generate_step(mx.array(prompt), model, max_tokens=max_tokens),
                               strict=False))
    return time.perf_counter() - start, count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    conc = args.concurrency or ([1, 4] if args.quick else [1, 4, 8, 16, 32])
    prompt_len = args.prompt_len or (16 if args.quick else 128)
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    loaded, name = load_model_for(args)
    from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlxkv.llm import LLM

    config = EngineConfig(cache=CacheConfig(), scheduler=SchedulerConfig(
        max_num_seqs=max(conc), max_num_batched_tokens=2048))
    llm = LLM(config, loaded=loaded)
    model = llm.engine.runner.model
    vocab = model.model.embed_tokens.weight.shape[0]
    variants = linear_variants(llm)
    settings = {"concurrency": conc, "prompt_len": prompt_len, "max_tokens": max_tokens,
                "repeats": repeats, "sampling": "greedy, ignore_eos",
                "linear": llm.engine.cache_stats()["linear"]["backend"],
                "metric": "generated tokens / wall time incl. prefill, median of repeats"}
    h = header(name, "float32", settings)
    print_header(h)
    rows = []
    for n in tqdm(conc, desc="concurrency"):
        prompts = make_prompts(n, prompt_len, vocab, seed=n)
        ours, theirs, single, mx_linear = [], [], [], []
        for _ in range(repeats):
            t, c = run_mlxkv(llm, prompts, max_tokens)
            ours.append(c / t)
            if "_mx_linear" in variants:
                variants["_mx_linear"]()
                t, c = run_mlxkv(llm, prompts, max_tokens)
                mx_linear.append(c / t)
                variants[""]()
            t, c = run_mlx_lm(model, prompts, max_tokens)
            theirs.append(c / t)
            if n == 1:
                t, c = run_mlx_lm_generate(model, prompts[0], max_tokens)
                single.append(c / t)
        row = {"concurrency": n, "mlxkv_tok_s": statistics.median(ours),
               "mlx_lm_tok_s": statistics.median(theirs)}
        row["ratio"] = row["mlxkv_tok_s"] / row["mlx_lm_tok_s"]
        line = (f"{n:>3} concurrent: mlxkv {row['mlxkv_tok_s']:8.1f} tok/s | mlx-lm "
                f"{row['mlx_lm_tok_s']:8.1f} tok/s | ratio {row['ratio']:.2f}")
        if mx_linear:
            row["mlxkv_mx_linear_tok_s"] = statistics.median(mx_linear)
            line += f" | mlxkv, MLX matmul {row['mlxkv_mx_linear_tok_s']:8.1f} tok/s"
        if single:
            row["mlx_lm_generate_tok_s"] = statistics.median(single)
            row["ratio_generate"] = row["mlxkv_tok_s"] / row["mlx_lm_generate_tok_s"]
            line += (f" | mlx-lm generate {row['mlx_lm_generate_tok_s']:8.1f} tok/s | ratio "
                     f"{row['ratio_generate']:.2f}")
        rows.append(row)
        tqdm.write(line)
    result = {**h, "rows": rows}
    tag = "throughput_quick" if args.quick else "throughput"
    write_json(tag, result, args.out)
    plot(RESULTS / f"{tag}.png" if args.out == str(RESULTS) else __import__("pathlib").Path(
        args.out) / f"{tag}.png", f"Aggregate throughput, {name}", "concurrent requests",
        "tokens/s", {"mlxkv": (conc, [r["mlxkv_tok_s"] for r in rows]),
                     "mlx-lm BatchGenerator": (conc, [r["mlx_lm_tok_s"] for r in rows])})
    return result


if __name__ == "__main__":
    main()
