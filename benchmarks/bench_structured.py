"""Structured outputs: schema validity over the 24-schema suite, and the cost of the masks.

1. Validity: every schema of _schemas.py, greedy and sampled (temperature 1), all in one
   continuous batch, on SmolLM2 and on a random tiny llama with SmolLM2's vocabulary; each
   output is checked with `jsonschema`. Target: 100% valid.
2. Throughput: 8 concurrent requests of max_tokens each, all unconstrained vs half of them
   constrained (an array of 40 objects, so no constrained output ends early); the two sides
   alternate, repeated, and the median of the per-pair ratios is reported. Target >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
from _common import header, print_header, write_json
from _schemas import SCHEMAS

from mlxkv.config import CacheConfig, EngineConfig
from mlxkv.llm import LLM
from mlxkv.sampling import SamplingParams

LONG_SCHEMA = {"type": "array", "minItems": 40, "maxItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "qty": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "qty"], "additionalProperties": False}}


def _smollm2():
    from mlxkv.models.loader import load_model

    return load_model("smollm2-135m-instruct", progress=False)


def _llm(model, tokenizer) -> LLM:
    config = EngineConfig(cache=CacheConfig(num_blocks=1024))
    return LLM(config, loaded=(model, tokenizer))


def _prompt(tokenizer, name: str, schema: dict) -> list[int]:
    messages = [{"role": "user", "content": f"Reply with JSON ({name}) matching: "
                 f"{json.dumps(schema)}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def validity(llm: LLM, max_tokens: int) -> dict:
    """Run every schema greedy and sampled in one batch; count jsonschema-valid outputs."""
    tok = llm.tokenizer
    prompts, params, names = [], [], []
    for name, schema, _ in SCHEMAS:
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            prompts.append(_prompt(tok, name, schema))
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temp, seed=7,
                                         json_schema=json.dumps(schema)))
            names.append((name, mode, schema))
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"s{i}", p, sp)
    texts = {f"s{i}": "" for i in range(len(prompts))}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    failures, num_valid = [], 0
    for i, (name, mode, schema) in enumerate(names):
        text = texts[f"s{i}"]
        try:
            jsonschema.validate(json.loads(text), schema)
            num_valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append({"schema": name, "mode": mode, "text": text,
                             "finish_reason": reasons[f"s{i}"], "error": str(exc)[:200]})
    return {"num_outputs": len(names), "num_valid": num_valid, "failures": failures,
            "samples": {f"{n}/{m}": texts[f"s{i}"] for i, (n, m, _) in enumerate(names)
                        if i < 8}}


def throughput(llm: LLM, max_tokens: int, repeats: int, concurrency: int = 8) -> dict:
    tok = llm.tokenizer
    prompts = [_prompt(tok, f"list {i}", LONG_SCHEMA) for i in range(concurrency)]
    free = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True)
    bound = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1,
                           json_schema=json.dumps(LONG_SCHEMA))
    half = concurrency // 2
    engine = llm.engine
    rows = []
    # warm-up: prefix cache, the llguidance tokenizer, compiled graphs
    llm.generate(prompts[:half], bound)
    llm.generate(prompts, free)
    for r in range(repeats):
        sides = {}
        for side in (("free", "mixed") if r % 2 == 0 else ("mixed", "free")):
            rids = [f"{side}{r}-{i}" for i in range(concurrency)]
            t0 = time.perf_counter()
            for i, (rid, p) in enumerate(zip(rids, prompts, strict=True)):
                engine.add_request(rid, p, bound if side == "mixed" and i < half else free)
            num_tokens, errors = 0, []
            while engine.has_unfinished():
                for o in engine.step():
                    num_tokens += len(o.new_token_ids)
                    errors += [o.error] if o.error else []
            sides[side] = num_tokens / (time.perf_counter() - t0)
            if errors or num_tokens != concurrency * max_tokens:
                raise RuntimeError(f"{side}: {num_tokens} tokens, errors {errors[:2]}")
        rows.append({"free_tok_s": sides["free"], "mixed_tok_s": sides["mixed"],
                     "ratio": sides["mixed"] / sides["free"]})
        print(f"  repeat {r}: all free {sides['free']:.1f} tok/s, half constrained "
              f"{sides['mixed']:.1f} tok/s, ratio {rows[-1]['ratio']:.3f}")
    return {"concurrency": concurrency, "num_constrained": half, "max_tokens": max_tokens,
            "rows": rows, "median_ratio": statistics.median(r["ratio"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model only, short runs")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    smol = _smollm2()
    from mlxkv.models.tiny import make_tiny_model

    vocab = smol.model.model.embed_tokens.weight.shape[0]
    tiny = make_tiny_model("llama", vocab_size=vocab)
    settings = {"validity_max_tokens": 96, "throughput_max_tokens": args.max_tokens,
                "repeats": args.repeats, "quick": args.quick, "grammar_engine": "llguidance"}
    h = header("smollm2-135m-instruct" if not args.quick else "tiny-llama (random)", "float32",
               settings)
    print_header(h)
    result = {**h, "validity": {}}
    models = {"tiny-llama (random, SmolLM2 vocab)": tiny}
    if not args.quick:
        models["smollm2-135m-instruct"] = smol.model
    for label, model in models.items():
        v = validity(_llm(model, smol.tokenizer), 96)
        result["validity"][label] = v
        print(f"{label}: {v['num_valid']}/{v['num_outputs']} schema-valid")
        for f in v["failures"]:
            print(f"  FAIL {f['schema']}/{f['mode']} ({f['finish_reason']}): {f['text']!r}")
    bench_model = tiny if args.quick else smol.model
    t = throughput(_llm(bench_model, smol.tokenizer), 16 if args.quick else args.max_tokens,
                   2 if args.quick else args.repeats)
    result["throughput"] = t
    print(f"throughput ratio (half constrained / all free), median: {t['median_ratio']:.3f} "
          f"(target >= 0.85)")
    write_json("structured_quick" if args.quick else "structured", result, args.out)


if __name__ == "__main__":
    main()
