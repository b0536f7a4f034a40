"""Speculative decoding (prompt lookup or a draft model) vs plain decoding, same engine, same run.

Tasks: "grounded" (rewrite a given Jane Austen passage with one change, or edit a code
file: the answer mostly copies the input, so n-gram drafts from the prompt pay) and
"free" (open-ended writing: little to look up). Each task runs at 1 and 8 concurrent
requests, greedy, both sides on the same prompts, repeats alternating which side goes
first. Greedy speculation is exact, so both sides generate the same tokens (checked).
Metric: decode tokens/s, i.e. tokens generated after every request of the round has its
first token, over the time from then to the end (prefill is the same on both sides).

Also measured: the cost of one forward step against the number of query rows in it (one
sequence with 1..16 rows, eight sequences with 8..64 rows between them, at a 600-token
context), the curve behind the sizing policy (mlxkv.speculative maximises expected tokens
per step time over `SpeculativeConfig.step_cost`; "step_cost" in the JSON is this run's
curve in that form).

    python benchmarks/bench_speculative.py                       # SmolLM2, ~10 minutes
    python benchmarks/bench_speculative.py --quick               # tiny random model
    python benchmarks/bench_speculative.py --method draft --draft-layers 24 --no-row-cost

`--method draft` drafts with `--draft-model` (default: the target itself) cut to its first
`--draft-layers` layers (an early-exit draft sharing the target's weights). Its rows are
written with "method": "draft" (and the draft's layers and cost) next to the rows of
other methods and settings already in the JSON, which are kept.
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from _common import RESULTS, bar_plot, header, load_model_for, print_header, write_json
from _corpus import austen

CODE_FILE = Path(__file__).parents[1] / "mlxkv" / "prefix.py"


def grounded_prompts(tokenizer, num: int, passage_chars: int) -> list[str]:
    """Rewrite-a-passage and edit-a-code-file requests (alternating)."""
    text = austen("prideprejudice")
    code = CODE_FILE.read_text()
    out = []
    for i in range(num):
        if i % 2:
            start = (i * 997) % max(1, len(code) - passage_chars)
            body = code[start : start + passage_chars]
            out.append("Rename the variable `block_id` to `bid` in this Python code and "
                       f"return the whole edited code:\n\n```python\n{body}\n```")
        else:
            start = 20000 + i * 7919
            body = text[start : start + passage_chars]
            out.append("Rewrite the following passage, replacing every name with "
                       f"'Anna' and changing nothing else:\n\n{body}")
    return [_chat(tokenizer, p) for p in out]


FREE = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Describe your ideal weekend in the mountains in detail.",
        "Explain to a child how rain forms, with an example.",
        "Write a letter to a friend about learning to bake bread.",
        "Invent a new board game and explain its rules.",
        "Tell a story about a robot that wants to become a gardener.",
        "Describe a busy market in a city you imagine.",
        "Write a diary entry of a sailor crossing the ocean."]


def free_prompts(tokenizer, num: int) -> list[str]:
    return [_chat(tokenizer, FREE[i % len(FREE)]) for i in range(num)]


def _chat(tokenizer, text: str):
    if tokenizer is None:  # --quick: the tiny model has no tokenizer
        return [(7 * ord(c) + 3) % 500 + 1 for c in text[:200]]
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True))


def decode_round(engine, prompts, params) -> dict:
    """Run the prompts together; decode tokens/s after the last first token."""
    from mlxkv.sampling import SamplingParams  # noqa: F401  (type of params)

    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    t_all_first = None
    after_first = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if t_all_first is not None:
                after_first += len(out.new_token_ids)
        if t_all_first is None and all(tokens.values()):
            t_all_first = time.perf_counter()
    elapsed = time.perf_counter() - t_all_first
    return {"tok_s": after_first / elapsed, "tokens_after_first": after_first,
            "seconds": elapsed, "token_ids": [tokens[f"b{i}"] for i in range(len(prompts))]}


def measure_task(engines: dict, prompts: list, params, repeats: int) -> dict:
    """Both sides on the same prompts, alternating order; medians of tokens/s."""
    runs: dict[str, list[dict]] = {side: [] for side in engines}
    for rep in range(repeats):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for side in order:
            engine = engines[side]
            engine.cache.evict_all_cached()  # no side reuses the other's prefix blocks
            runs[side].append(decode_round(engine, prompts, params))
    same = runs["plain"][-1]["token_ids"] == runs["speculative"][-1]["token_ids"]
    spec = engines["speculative"].speculator.counters
    out = {side: statistics.median(r["tok_s"] for r in rs) for side, rs in runs.items()}
    return {"plain_tok_s": out["plain"], "speculative_tok_s": out["speculative"],
            "ratio": out["speculative"] / out["plain"], "identical_tokens": same,
            "acceptance": spec["spec_accepted_tokens"] / max(1, spec["spec_proposed_tokens"]),
            "draft_tokens": spec["spec_proposed_tokens"],
            "accepted_tokens": spec["spec_accepted_tokens"],
            "tokens_per_step_seq": None,
            "runs": {side: [{k: v for k, v in r.items() if k != "token_ids"} for r in rs]
                     for side, rs in runs.items()}}


ROWS_ONE_SEQ = (1, 2, 4, 8, 12, 16)
ROWS_EIGHT_SEQS = (8, 12, 16, 20, 24, 25, 28, 32, 40, 48, 64)


def row_cost(engine, context: int = 600, repeats: int = 5,
             grid=((1, ROWS_ONE_SEQ), (8, ROWS_EIGHT_SEQS))) -> list[dict]:
    """Forward-step time by total query rows, for each (num_seqs, totals) of `grid`: every
    sequence at `context` tokens, the rows spread evenly (as verification rows, each row's
    logits computed), the totals interleaved within each repeat; medians."""
    import mlx.core as mx

    from mlxkv.inputs import SeqEntry, build_batch

    cache, runner = engine.cache, engine.runner
    curve = []
    for num_seqs, totals in grid:
        ids = [f"rc{num_seqs}_{i}" for i in range(num_seqs)]
        top = -(-max(totals) // num_seqs)
        for n, rid in enumerate(ids):
            cache.lookup(rid, [])
            cache.allocate_slots(rid, context + top)
            toks = [(7 * i + n) % 400 + 1 for i in range(context)]
            entry = SeqEntry(toks, 0, cache.slot_mapping(rid, 0, context),
                             cache.block_tables(rid))
            mx.eval(runner.forward(build_batch([entry])), engine.store.arrays())

        def step(total: int, ids=ids) -> float:
            base, extra = divmod(total, len(ids))
            entries = []
            for i, rid in enumerate(ids):
                r = base + (i < extra)
                entries.append(SeqEntry([5] * r, context, cache.slot_mapping(
                    rid, context, context + r), cache.block_tables(rid), True, r))
            start = time.perf_counter()
            mx.eval(runner.forward(build_batch(entries)), engine.store.arrays())
            return time.perf_counter() - start

        times: dict[int, list[float]] = {r: [] for r in totals}
        for rep in range(repeats + 1):
            for r in totals:
                t = step(r)
                if rep:  # the first round warms up
                    times[r].append(t)
        for rid in ids:
            cache.free(rid)
        curve += [{"num_seqs": num_seqs, "rows": r, "step_ms": statistics.median(t) * 1e3}
                  for r, t in times.items()]
    one = next(c["step_ms"] for c in curve if c["rows"] == 1)
    for c in curve:
        c["vs_one_row"] = c["step_ms"] / one
    return curve


def fit_step_cost(curve: list[dict]) -> list[tuple[int, float]]:
    """A `SpeculativeConfig.step_cost` curve from the measurement: one sequence's points
    below 8 rows, eight sequences' from 8, relative to the one-row step, made
    non-decreasing."""
    pts = sorted((c["rows"], c["vs_one_row"]) for c in curve
                 if (c["num_seqs"] == 1) == (c["rows"] < 8))
    knots, top = [], 0.0
    for rows, cost in pts:
        top = max(top, cost)
        knots.append((rows, round(top, 2)))
    return knots


def fit_r0(curve: list[dict]) -> float:
    """R0 of step_time ~ t1 * (R0 + rows): least squares over the eight-sequence points."""
    pts = [c for c in curve if c["num_seqs"] == 8] or curve
    xs, ys = [c["rows"] for c in pts], [c["step_ms"] for c in pts]
    mx_, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx_) ** 2 for x in xs)
    return (my - slope * mx_) / slope if slope > 0 else float("inf")


def build_engines(loaded, args) -> dict:
    from mlxkv.config import CacheConfig, EngineConfig, SpeculativeConfig
    from mlxkv.llm import LLM

    base = EngineConfig(cache=CacheConfig(memory_budget_bytes=args.kv_memory))
    draft = {}
    if args.method == "draft":
        draft = {"draft_model": args.draft_model or args.model or "tiny",
                 "draft_layers": args.draft_layers, "draft_cost": args.draft_cost}
    cost = {"step_cost": parse_step_cost(args.step_cost)} if args.step_cost else {}
    spec = SpeculativeConfig(method=args.method, num_speculative_tokens=args.k, **cost, **draft)
    # --quick: the tiny model has no folder to load the draft from: it drafts for itself
    own = loaded if args.method == "draft" and isinstance(loaded, tuple) else None
    return {"plain": LLM(base, loaded=loaded).engine,
            "speculative": LLM(replace(base, speculative=spec), loaded=loaded,
                               draft=own).engine}


def parse_step_cost(text: str) -> tuple[tuple[int, float], ...]:
    """"1:1,8:1.5,24:2.5" -> ((1, 1.0), (8, 1.5), (24, 2.5))."""
    return tuple((int(r), float(c)) for r, c in (k.split(":") for k in text.split(",")))


def variant(row: dict) -> tuple:
    """What a row measured besides its cell: the method and the draft's settings."""
    return (row.get("method", "ngram"), row.get("draft_layers"), row.get("draft_cost"))


def merge_previous(path: Path, result: dict) -> dict:
    """Keep the rows (and row-cost curve) of other variants already in `path`; each
    variant's run header goes under "runs" (the top-level header is this run's)."""
    if not path.is_file():
        return result
    import json

    old = json.loads(path.read_text())
    runs = old.get("runs") or {}
    for row in old.get("rows", []):
        row.setdefault("method", "ngram")
        key = "/".join(str(v) for v in variant(row))
        runs.setdefault(key, {k: old[k] for k in ("timestamp", "git_revision", "settings")
                              if k in old})
    mine = {variant(r) for r in result["rows"]}
    result["rows"] = [r for r in old.get("rows", []) if variant(r) not in mine] + result["rows"]
    for key in mine:
        runs["/".join(str(v) for v in key)] = {k: result[k] for k in
                                               ("timestamp", "git_revision", "settings")}
    result["runs"] = runs
    if "row_cost" not in result and "row_cost" in old:
        result["row_cost"] = old["row_cost"]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tasks", nargs="+", default=["grounded", "free"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--passage-chars", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--step-cost", default=None,
                   help="the sizing's step-time curve, rows:time,... (default: the config's)")
    p.add_argument("--row-cost-context", type=int, default=600)
    p.add_argument("--kv-memory", type=int, default=256 << 20)
    p.add_argument("--no-row-cost", action="store_true")
    p.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    p.add_argument("--draft-model", default=None, help="default: the target model")
    p.add_argument("--draft-layers", type=int, default=None)
    p.add_argument("--draft-cost", type=float, default=None,
                   help="draft step / target step for the sizing (default: parameter ratio)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.concurrency, args.repeats = 16, [1, 2], 1
        args.passage_chars = 120
        if args.method == "draft" and args.draft_layers is None:
            args.draft_layers = 2  # of the tiny model's 3
    if not args.quick and args.model is None:
        args.model = "smollm2-135m-instruct"
    loaded, name = load_model_for(args)
    from mlxkv.sampling import SamplingParams

    tokenizer = loaded[1] if isinstance(loaded, tuple) else loaded.tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    result = header(name, "float32", settings)
    print_header(result)
    engines = build_engines(loaded, args)
    rows = []
    for task in args.tasks:
        for conc in args.concurrency:
            prompts = (grounded_prompts(tokenizer, conc, args.passage_chars)
                       if task == "grounded" else free_prompts(tokenizer, conc))
            for e in engines.values():
                for key in e.speculator.counters:
                    e.speculator.counters[key] = 0
            r = measure_task(engines, prompts, params, args.repeats)
            rows.append({"task": task, "concurrency": conc, "method": args.method, **r})
            if args.method == "draft":
                model = engines["speculative"].speculator.model
                rows[-1].update(draft_layers=args.draft_layers, draft_cost=args.draft_cost,
                                draft_relative_cost=model.relative_cost)
            print(f"{task:>8} x{conc}: plain {r['plain_tok_s']:6.1f} tok/s, speculative "
                  f"{r['speculative_tok_s']:6.1f} tok/s, ratio {r['ratio']:.2f}, acceptance "
                  f"{r['acceptance']:.2f} of {r['draft_tokens']}, identical "
                  f"{r['identical_tokens']}", flush=True)
    result["rows"] = rows
    if not args.no_row_cost:
        grid = ((1, (1, 2, 4)), (8, (8, 16, 32))) if args.quick else None
        curve = row_cost(engines["plain"], context=64 if args.quick else args.row_cost_context,
                         **({"grid": grid, "repeats": 2} if grid else {}))
        result["row_cost"] = {"curve": curve, "r0_rows": fit_r0(curve),
                              "step_cost": fit_step_cost(curve)}
        print("row cost:", ", ".join(f"{c['num_seqs']}x{c['rows']} rows {c['step_ms']:.0f} ms"
                                     for c in curve), f"-> step_cost {fit_step_cost(curve)}")
    out_dir = Path(args.out) if args.out else RESULTS
    stem = "speculative_quick" if args.quick else "speculative"
    result = merge_previous(out_dir / f"{stem}.json", result)
    write_json(stem, result, out_dir)
    plot(out_dir / f"{stem}.png", name, result["rows"])
    return result


def plot(path: Path, name: str, rows: list[dict]) -> None:
    """Ratio bars per task: ng = prompt lookup, dN = draft of N layers (c0: draft_cost 0)."""
    bar_plot(path, f"speculative / plain decode tokens/s ({name})",
             {t: {_label(r): r["ratio"] for r in rows if r["task"] == t}
              for t in dict.fromkeys(r["task"] for r in rows)})


def _label(row: dict) -> str:
    method, layers, cost = variant(row)
    short = "ng" if method == "ngram" else f"d{layers or ''}"
    if cost is not None:
        short += f"c{cost:g}"
    return f"{short}\nx{row['concurrency']}"


if __name__ == "__main__":
    main()
