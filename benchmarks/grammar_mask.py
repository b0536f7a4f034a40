"""Mask time per token, llguidance vs xgrammar, on a real vocabulary (SmolLM2's by default).

For every schema of _schemas.py, walk the tokens of its valid instance (compact JSON, the
separators mlxkv.structured uses): compute the next-token bitmask, then accept the token.
Both engines run in the same process, interleaved per schema. Reports compile time and
per-token mask time (median, p99, mean). xgrammar is optional (it pulls in torch): without
it only llguidance is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import header, print_header, write_json
from _schemas import SCHEMAS


def _hf_tokenizer(model: str):
    from transformers import AutoTokenizer

    from mlxkv.models.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(model, progress=False)))


def run_llguidance(tok, schema: str, token_ids: list[int], vocab: int):
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    from mlxkv.structured import json_grammar

    lltok = run_llguidance.cache = getattr(run_llguidance, "cache", None) or \
        llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, json_grammar(schema), log_level=0)
    compile_s = time.perf_counter() - t0
    mask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    times = []
    for t in token_ids:
        t0 = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t0)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1, "valid token masked out"
        assert matcher.consume_token(t), matcher.get_error()
    return compile_s, times


def run_xgrammar(tok, schema: str, token_ids: list[int], vocab: int):
    import xgrammar as xgr

    if getattr(run_xgrammar, "compiler", None) is None:
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        run_xgrammar.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = run_xgrammar.compiler.compile_json_schema(
        schema, any_whitespace=False, separators=(", ", ": "))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in token_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t0)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1, "valid token masked out"
        assert matcher.accept_token(t)
    return compile_s, times


def _summary(compiles: list[float], times: list[float]) -> dict:
    us = sorted(t * 1e6 for t in times)
    return {"num_tokens": len(us), "mask_us_median": statistics.median(us),
            "mask_us_p99": us[min(len(us) - 1, int(0.99 * len(us)))],
            "mask_us_mean": statistics.fmean(us),
            "compile_ms_median": statistics.median(compiles) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = _hf_tokenizer(args.model)
    vocab = len(tok)
    engines = {"llguidance": run_llguidance}
    try:
        import xgrammar  # noqa: F401

        engines["xgrammar"] = run_xgrammar
    except ImportError:
        print("# xgrammar not installed: llguidance only")
    h = header(args.model, "n/a", {"vocab_size": vocab, "num_schemas": len(SCHEMAS),
                                   "repeats": args.repeats, "engines": list(engines)})
    print_header(h)
    compiles = {k: [] for k in engines}
    times = {k: [] for k in engines}
    for _ in range(args.repeats):
        for _, schema, example in SCHEMAS:
            text = json.dumps(example, separators=(", ", ": "))
            ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            for name, fn in engines.items():  # interleaved per schema
                c, t = fn(tok, json.dumps(schema), ids, vocab)
                compiles[name].append(c)
                times[name] += t
    rows = {name: _summary(compiles[name], times[name]) for name in engines}
    for name, r in rows.items():
        print(f"{name:11s} mask median {r['mask_us_median']:8.1f} us  p99 "
              f"{r['mask_us_p99']:8.1f} us  mean {r['mask_us_mean']:8.1f} us  "
              f"compile median {r['compile_ms_median']:7.2f} ms  ({r['num_tokens']} tokens)")
    write_json("grammar_mask", {**h, "rows": rows, "mask_check": "every instance token "
                                "allowed by both engines"}, args.out)


if __name__ == "__main__":
    main()
