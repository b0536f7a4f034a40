"""Detokenizer cost per token over a long answer: full re-decode (old) vs bounded window (new).

Streams a --tokens long answer (English prose with some emoji, accents and CJK) through
`FullDecodeDetokenizer` and `Detokenizer` one token at a time, as the engine does, and
times every `update()` (the fastest of --repeats runs). The per-token time is summarised
per position bucket and by a least-squares slope against the position: a slope near zero
means the per-token cost is independent of the length (total cost linear in it); a
positive one means it grows with the length (total cost quadratic).

    python benchmarks/detok_cost.py                         # SmolLM2 and Gemma-3, 2,000 tokens
    python benchmarks/detok_cost.py --quick                 # SmolLM2, 200 tokens, once
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import header, write_json

from mlxkv.detokenizer import Detokenizer, FullDecodeDetokenizer
from mlxkv.models.builtin import ensure_builtin

PROSE = (
    "It was a bright cold morning, and the letters had come early. 📬 She read them twice — "
    "once for the news, once for the manner — and then laid them aside with a smile. 😊 "
    "The café across the square (naïve in its décor, but warm) was already full; "
    "someone was reading 日本語の新聞 and someone else a Korean novel, 한국어 소설. "
    "Nothing of consequence happened until noon, when the rain began. 🌧️ "
)


def answer_ids(tokenizer, num_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += tokenizer.encode(PROSE, add_special_tokens=False)
    return ids[:num_tokens]


def time_updates(make, ids: list[int], repeats: int) -> list[float]:
    """Each update()'s wall time in microseconds, per position: the fastest of the repeats
    (the least disturbed by other work on a shared machine)."""
    runs = []
    for _ in range(repeats):
        detok, times = make(), []
        for i in range(1, len(ids) + 1):
            window = ids[:i]  # NOTE: the engine passes its list; slicing here is not timed
            start = time.perf_counter()
            detok.update(window, final=i == len(ids))
            times.append((time.perf_counter() - start) * 1e6)
        runs.append(times)
    return [min(col) for col in zip(*runs, strict=True)]


def summarise(per_token_us: list[float], num_buckets: int = 8) -> dict:
    n = len(per_token_us)
    size = max(1, n // num_buckets)
    buckets = [statistics.median(per_token_us[i : i + size]) for i in range(0, n, size)]
    xs = range(n)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(per_token_us)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, per_token_us, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs)
    return {
        "total_ms": round(sum(per_token_us) / 1e3, 2),
        "per_token_us_median": round(statistics.median(per_token_us), 2),
        "per_token_us_by_bucket": [round(b, 2) for b in buckets],
        "bucket_tokens": size,
        "slope_us_per_1000_tokens": round(slope * 1000, 3),
        "last_over_first_bucket": round(buckets[-1] / buckets[0], 2),
    }


def measure(model: str, num_tokens: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_builtin(model, progress=False)))
    ids = answer_ids(tokenizer, num_tokens)
    stop = ["\n\nUser:"]  # one stop string that never matches, as a chat request would have
    old = summarise(time_updates(lambda: FullDecodeDetokenizer(tokenizer, stop), ids, repeats))
    new = summarise(time_updates(lambda: Detokenizer(tokenizer, stop), ids, repeats))
    for row in (old, new):  # per-token cost flat in length <=> total cost linear in it
        row["total_cost"] = "linear" if row["last_over_first_bucket"] < 2 else "superlinear"
    return {"model": model, "num_tokens": num_tokens, "old_full_decode": old,
            "new_window": new, "total_speedup": round(old["total_ms"] / new["total_ms"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, 200 tokens, once")
    parser.add_argument("--out", default=None, help="also write detok_cost.json to this folder")
    args = parser.parse_args()
    if args.quick:
        args.models, args.tokens, args.repeats = args.models[:1], 200, 1
    settings = {"tokens": args.tokens, "repeats": args.repeats}
    result = header(",".join(args.models), "n/a", settings)
    result["rows"] = [measure(m, args.tokens, args.repeats) for m in args.models]
    print(json.dumps(result, indent=2))
    if args.out:
        write_json("detok_cost", result, args.out)


if __name__ == "__main__":
    main()
