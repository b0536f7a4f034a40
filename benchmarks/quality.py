"""Compressed-KV quality: dPPL and KL vs the uncompressed cache, errors compounding in decode.

For each codec spec, N windows of the Jane Austen corpus go through mlxkv's own paged
data plane (KVStore in the codec's packed layout, reference attention decoding it): the
first half of each window is prefilled in one chunk, the second half is decoded token by
token (all windows batched), so every scored token reads K/V that went through the codec,
including K/V written during decode. Scored: the decode half's next-token NLL; KL is
KL(uncompressed || compressed) over the same positions.

    python benchmarks/quality.py --model smollm2-135m-instruct
    python benchmarks/quality.py --model gemma3-270m
    python benchmarks/quality.py --quick          # tiny random model, random tokens
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import math

from _common import RESULTS, header, load_model_for, plot, print_header, write_json  # first: BLAS

import mlx.core as mx  # noqa: E402, I001
from tqdm import tqdm

from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_store import KVStore
from mlxkv.models.adapter import group_specs_for
from mlxkv.runner import ModelRunner

CODECS = ["auto", "int8", "int4", "lloyd:k4v4", "lloyd:k4v3", "e8:k4v4", "e8:k4v3",
          "d4:k4v3", "e8:k3v3", "e8:k3v2", "lloyd:k3v2", "e8:k2v2"]


def windows_from_corpus(tokenizer, ctx: int, num: int, offset_chars: int) -> list[list[int]]:
    from _corpus import austen

    ids = tokenizer.encode(austen("mansfieldpark")[offset_chars:offset_chars + ctx * num * 8])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:  # the tokenizer adds BOS: every window gets one
        ids = ids[1:]
        return [[bos] + ids[i * (ctx - 1) : (i + 1) * (ctx - 1)] for i in range(num)]
    return [ids[i * ctx : (i + 1) * ctx] for i in range(num)]


def run_codec(model, spec: str, windows: list[list[int]], block_size: int = 16):
    """Logits [num_windows, scored, vocab] for the decode halves, and KV bytes per token."""
    groups = group_specs_for(model)
    ctx = len(windows[0])
    blocks = [len(windows) * (ctx // block_size + 2) + 1] * len(groups)
    store = KVStore(groups, blocks, block_size, mx.float32,
                    parse_kv_codec(spec, len(model.layers)))
    cache = KVCacheManager(groups, blocks, block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, store)
    half = ctx // 2
    entries = []
    for i, w in enumerate(windows):
        cache.lookup(str(i), w)
        cache.allocate_slots(str(i), half)
        entries.append(SeqEntry(w[:half], 0, cache.slot_mapping(str(i), 0, half),
                                cache.block_tables(str(i))))
    steps = [runner.forward(build_batch(entries))]
    for pos in range(half, ctx - 1):
        entries = []
        for i, w in enumerate(windows):
            cache.allocate_slots(str(i), 1)
            entries.append(SeqEntry([w[pos]], pos, cache.slot_mapping(str(i), pos, pos + 1),
                                    cache.block_tables(str(i))))
        logits = runner.forward(build_batch(entries))
        mx.eval(logits, store.arrays())
        steps.append(logits)
    return mx.stack(steps, axis=1), store.bytes_per_token()


def score(logits: mx.array, ref_logits: mx.array, windows: list[list[int]]) -> dict:
    half = len(windows[0]) // 2
    targets = mx.array([w[half:] for w in windows])  # [N, scored]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref_logp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[..., None], axis=-1).mean().item()
    kl = mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1).mean().item()
    return {"nll": nll, "ppl": math.exp(nll), "kl": kl}


def iso_table(rows: list[dict], fp16_bytes: float) -> list[dict]:
    """Per dPPL target, the cheapest codec within it and its compression vs fp16."""
    out = []
    for target in (0.5, 1.0, 2.0):
        ok = [r for r in rows if r["codec"] != "auto" and r["dppl_pct"] <= target]
        best = min(ok, key=lambda r: r["bytes_per_token"]) if ok else None
        out.append({"dppl_target_pct": target, "codec": best and best["codec"],
                    "bytes_per_token": best and best["bytes_per_token"],
                    "x_vs_fp16": best and fp16_bytes / best["bytes_per_token"]})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--offset-chars", type=int, default=100_000)
    p.add_argument("--codecs", nargs="+", default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    ctx = args.ctx or (16 if args.quick else 256)
    num = args.windows or (2 if args.quick else 8)
    codecs = args.codecs or (["auto", "int8", "e8:k4v3"] if args.quick else CODECS)
    if args.quick and not args.model:  # affine codecs need head_dim % 64 == 0
        from mlxkv.models.tiny import make_tiny_model

        loaded = (make_tiny_model("llama", head_dim=64, num_attention_heads=2,
                                  num_key_value_heads=1, hidden_size=128), None)
        name = "tiny-llama (random)"
    else:
        loaded, name = load_model_for(args)
    model = loaded[0] if isinstance(loaded, tuple) else loaded.model
    if args.quick and not args.model:
        windows = [[(7 * i + 3 * j) % 500 + 1 for i in range(ctx)] for j in range(num)]
    else:
        windows = windows_from_corpus(loaded.tokenizer, ctx, num, args.offset_chars)
    settings = {"ctx": ctx, "windows": num, "scored_tokens": num * (ctx - ctx // 2),
                "protocol": "prefill first half in one chunk, decode second half token by "
                "token through the compressed paged cache", "corpus": "Mansfield Park",
                "offset_chars": args.offset_chars}
    h = header(name, "float32", settings)
    print_header(h)
    layers = model.layers
    kv_heads_dims = group_specs_for(model)
    fp16_bytes = sum(2 * len(g.layer_ids) * g.num_kv_heads * g.head_dim * 2
                     for g in kv_heads_dims)
    ref, rows = None, []
    for spec in tqdm(codecs, desc="codecs"):
        logits, bytes_per_token = run_codec(model, spec, windows)
        if ref is None:
            ref = logits
        s = score(logits, ref, windows)
        rows.append({"codec": spec, "bytes_per_token": bytes_per_token,
                     "x_vs_fp16": fp16_bytes / bytes_per_token, **s})
    base = rows[0]["ppl"]
    for r in rows:
        r["dppl_pct"] = 100 * (r["ppl"] / base - 1)
        tqdm.write(f"{r['codec']:>12}: {r['bytes_per_token']:7.0f} B/token "
                   f"({r['x_vs_fp16']:4.2f}x vs fp16)  PPL {r['ppl']:8.3f}  "
                   f"dPPL {r['dppl_pct']:+6.2f}%  KL {r['kl']:.5f}")
    result = {**h, "num_layers": len(layers), "fp16_bytes_per_token": fp16_bytes,
              "rows": rows, "iso_dppl": iso_table(rows, fp16_bytes)}
    tag = f"quality_{name.split()[0]}" + ("_quick" if args.quick else "")
    from pathlib import Path

    write_json(tag, result, args.out)
    families = {}
    for r in rows[1:]:
        fam = r["codec"].split(":")[0]
        families.setdefault(fam, ([], []))
        families[fam][0].append(r["bytes_per_token"])
        families[fam][1].append(max(r["dppl_pct"], 1e-3))
    plot(Path(args.out) / f"{tag}.png", f"KV bytes/token vs dPPL, {name}", "KV bytes per token",
         "dPPL %", {k: v for k, v in families.items()})
    return result


if __name__ == "__main__":
    main()
