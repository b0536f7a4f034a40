"""`mlxkv bench`: a quick in-process benchmark suite with one summary table.

Measures on the chosen model (default: the embedded one; `--tiny` for a random tiny
model): decode throughput at 1 and 8 concurrent requests, time to first token cold vs on
a prefix-cache hit, and KV bytes per token per codec. The full, side-by-side benchmarks
(mlx-lm baselines, plots, JSON) live in the repository's benchmarks/ folder.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from mlxkv.config import CacheConfig, EngineConfig, ModelConfig
from mlxkv.sampling import SamplingParams


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model (default: the embedded one)")
    parser.add_argument("--tiny", action="store_true", help="use a random tiny model")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results to this file")


def _throughput(llm, num: int, max_tokens: int, vocab: int) -> float:
    rng = random.Random(num)
    prompts = [[rng.randrange(10, vocab) for _ in range(64)] for _ in range(num)]
    llm.engine.cache.evict_all_cached()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o["token_ids"]) for o in outs) / (time.perf_counter() - start)


def _ttft(llm, prompt: list[int]) -> float:
    start = time.perf_counter()
    for _ in llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0.0)):
        break
    return time.perf_counter() - start


def _kv_bytes(model) -> dict[str, int]:
    import mlx.core as mx

    from mlxkv.codec import parse_kv_codec
    from mlxkv.engine_factory import _bytes_per_block
    from mlxkv.models.adapter import group_specs_for

    groups = group_specs_for(model)
    out = {}
    for spec in ("fp16", "int8", "int4", "e8:k4v3", "e8:k3v2"):
        try:
            codecs = parse_kv_codec(spec, len(model.layers))
            out[spec] = sum(_bytes_per_block(groups, codecs, 1, mx.float16))
        except ValueError:
            continue  # e.g. affine codecs need head_dim % 64 == 0
    return out


def main(args) -> int:
    from mlxkv.llm import LLM

    loaded = None
    if args.tiny:
        from mlxkv.models.tiny import make_tiny_model

        loaded = (make_tiny_model("llama", head_dim=64, num_attention_heads=2,
                                  num_key_value_heads=1, hidden_size=128), None)
    llm = LLM(EngineConfig(model=ModelConfig(model=args.model), cache=CacheConfig()),
              loaded=loaded)
    model = llm.engine.runner.model
    vocab = min(model.model.embed_tokens.weight.shape[0], 20000)
    prompt = [random.Random(0).randrange(10, vocab) for _ in range(256)]
    results = {
        "decode_tok_s_1": _throughput(llm, 1, args.max_tokens, vocab),
        "decode_tok_s_8": _throughput(llm, 8, args.max_tokens, vocab),
        "ttft_cold_s": _ttft(llm, prompt),
        "ttft_prefix_hit_s": _ttft(llm, prompt),
        "kv_bytes_per_token": _kv_bytes(model),
    }
    print(f"{'metric':<34}value")
    print(f"{'aggregate tok/s, 1 request':<34}{results['decode_tok_s_1']:.1f}")
    print(f"{'aggregate tok/s, 8 requests':<34}{results['decode_tok_s_8']:.1f}")
    print(f"{'TTFT 256-token prompt, cold':<34}{results['ttft_cold_s'] * 1e3:.0f} ms")
    print(f"{'TTFT same prompt, prefix hit':<34}{results['ttft_prefix_hit_s'] * 1e3:.0f} ms")
    for spec, nbytes in results["kv_bytes_per_token"].items():
        print(f"{'KV bytes/token, ' + spec:<34}{nbytes}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
