"""Compressed-KV quality: dPPL and KL vs the uncompressed cache, errors compounding in decode.

For each codec spec and window length, N windows of the Jane Austen corpus go through
mlxkv's paged data plane: the first half of each window is prefilled in one chunk, the
second half is decoded token by token (all windows batched), so every scored token reads
K/V that went through the codec, including K/V written during decode. Scored: the decode
half's next-token NLL; KL(uncompressed || compressed) over the same positions, on the
reference's top-64 tokens plus the tail mass (mlxkv.kv_profile.TopKReference).

By default the pools hold each codec's round trip (mlxkv.codec.roundtrip: the values any
decode of the packed layout yields, tests/codec/test_roundtrip.py), so the compiled CPU
decode attention reads them; `--packed` stores the packed layout and decodes on every
read (same logits, far slower). Bytes are the packed codec's, metadata included.

    python benchmarks/quality.py --model smollm2-135m-instruct --ctx 1024 2048
    python benchmarks/quality.py --quick          # tiny random model, random tokens
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from _common import RESULTS, header, load_model_for, plot, print_header, write_json  # first: BLAS

import mlx.core as mx  # noqa: E402, I001

from mlxkv.attention import default_decode_op
from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.codec.roundtrip import round_trip_layers
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_profile import TopKReference
from mlxkv.kv_store import KVStore
from mlxkv.models.adapter import group_specs_for
from mlxkv.runner import ModelRunner
from _kvbytes import geometry, projection, split_bytes  # noqa: E402

CODECS = ["auto", "int8", "int6", "int4", "e8:k8v8", "e8:k7v7", "e8:k6v6", "e8:k6v5",
          "e8:k5v5", "e8:k4v4", "lloyd:k6v6", "lloyd:k6v5", "lloyd:k5v5", "lloyd:k4v4",
          "d4:k6v5", "auto:3.0x", "auto:3.5x"]


def windows_from_corpus(tokenizer, ctx: int, num: int, offset_chars: int) -> list[list[int]]:
    from _corpus import austen

    ids = tokenizer.encode(austen("mansfieldpark")[offset_chars:offset_chars + ctx * num * 8])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:  # the tokenizer adds BOS: every window gets one
        ids = ids[1:]
        return [[bos] + ids[i * (ctx - 1) : (i + 1) * (ctx - 1)] for i in range(num)]
    return [ids[i * ctx : (i + 1) * ctx] for i in range(num)]


def _scores(logits, targets, ref_chunk):
    """(nll [N, T], kl [N, T] or None, TopKReference or None) of logits [N, T, vocab]."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if ref_chunk is None:
        return nll, None, TopKReference.of(logits)
    return nll, ref_chunk.kl(logits), None


def _chunk_batch(cache, windows, start, end, logits_all: bool):
    entries = []
    for i, w in enumerate(windows):
        cache.allocate_slots(str(i), end - start)
        entries.append(SeqEntry(w[start:end], start, cache.slot_mapping(str(i), start, end),
                                cache.block_tables(str(i))))
    batch = build_batch(entries)
    if logits_all:  # every position of the chunk is scored (teacher forcing)
        rows = [i * (end - start) + p for i in range(len(windows)) for p in range(end - start)]
        batch = dataclasses.replace(batch, logits_indices=mx.array(rows, dtype=mx.int32))
    return batch


def run_codec(model, layer_codecs, windows, ref=None, block_size: int = 16, packed=False,
              chunk: int = 1):
    """Scores of the second halves: nll and kl [N, scored], the store, and (when `ref` is
    None) the per-chunk TopKReference list to score later codecs against.

    The first half is prefilled in one chunk; the second half goes through the paged cache
    `chunk` tokens per forward (1: token by token). Teacher-forced, every chunk size reads
    the same coded K/V (each token's K/V are written, coded, before any query reads them),
    so the logits agree to fp32 noise (tests/codec/test_roundtrip.py, and `chunk_check` in
    this script's JSON); larger chunks only save forwards.
    """
    groups = group_specs_for(model)
    ctx = len(windows[0])
    blocks = [len(windows) * (ctx // block_size + 2) + 1] * len(groups)
    codecs = layer_codecs if packed else round_trip_layers(layer_codecs)
    store = KVStore(groups, blocks, block_size, mx.float32, codecs)
    cache = KVCacheManager(groups, blocks, block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, store, None if packed else default_decode_op())
    half, all_ids = ctx // 2, mx.array(windows)
    for i, w in enumerate(windows):
        cache.lookup(str(i), w)
    # the prefill's last logits predict token `half`; a chunk over [a, b) predicts a+1..b
    logits = runner.forward(_chunk_batch(cache, windows, 0, half, False))[:, None]
    nlls, kls, refs = [], [], []
    pos = half  # the next token to score
    while True:
        nll, kl, r = _scores(logits, all_ids[:, pos:pos + logits.shape[1]],
                             None if ref is None else ref[len(nlls)])
        mx.eval(nll) if kl is None else mx.eval(nll, kl)
        nlls.append(nll), kls.append(kl), refs.append(r)
        pos += logits.shape[1]
        if pos >= ctx:
            break
        start, end = pos - 1, min(ctx - 1, pos - 1 + chunk)
        logits = runner.forward(_chunk_batch(cache, windows, start, end, True))
        logits = logits.reshape(len(windows), end - start, -1)
        mx.eval(logits, store.arrays())
    kl = None if ref is None else mx.concatenate(kls, axis=1)
    return mx.concatenate(nlls, axis=1), kl, store, (refs if ref is None else None)


def iso_table(rows: list[dict], key: str = "x_vs_fp16") -> list[dict]:
    """Per dPPL target, the cheapest codec within it (overall and per family)."""
    out = []
    for target in (0.5, 1.0, 2.0):
        entry = {"dppl_target_pct": target}
        for fam in (None, "affine", "lattice", "lloyd", "auto"):
            ok = [r for r in rows if r["codec"] != "auto" and r["dppl_pct"] <= target
                  and (fam is None or r["family"] == fam)]
            best = max(ok, key=lambda r: r[key]) if ok else None
            label = "" if fam is None else f"{fam}_"
            entry[f"{label}codec"] = best and best["codec"]
            entry[f"{label}x_vs_fp16"] = best and best[key]
            if fam is None:
                entry["bytes_per_token"] = best and best["bytes_per_token"]
        out.append(entry)
    return out


def family_of(spec: str) -> str:
    head = spec.split(",")[0]
    if head.startswith("auto:"):
        return "auto"
    if head.startswith(("e8", "d4")):
        return "lattice"
    if head.startswith("lloyd"):
        return "lloyd"
    return "affine" if head.startswith("int") else "full"


def chunk_check(model, windows, spec: str, chunk: int) -> dict:
    """Max |difference| of per-token NLL and KL between token-by-token decode and `chunk`."""
    codecs = parse_kv_codec(spec, len(model.layers))
    one = run_codec(model, None, windows, chunk=1)
    many = run_codec(model, None, windows, chunk=chunk)
    a = run_codec(model, codecs, windows, one[3], chunk=1)
    b = run_codec(model, codecs, windows, many[3], chunk=chunk)
    return {"spec": spec, "ctx": len(windows[0]), "windows": len(windows), "chunk": chunk,
            "max_abs_nll_diff": mx.max(mx.abs(a[0] - b[0])).item(),
            "max_abs_kl_diff": mx.max(mx.abs(a[1] - b[1])).item(),
            "mean_nll_token_by_token": mx.mean(a[0]).item(), "mean_nll_chunked": mx.mean(b[0]).item()}


def evaluate(model, name, specs, windows, packed, chunk, on_row=None) -> list[dict]:
    geo = geometry(model)
    ctx = len(windows[0])
    ref_nll, _, store, ref = run_codec(model, None, windows, packed=packed, chunk=chunk)
    rows = []
    for spec in specs:
        t0 = time.time()
        codecs = parse_kv_codec(spec, len(model.layers), model_name=name)
        if spec == "auto":
            nll, kl = ref_nll, mx.zeros(ref_nll.shape)
        else:
            nll, kl, store, _ = run_codec(model, codecs, windows, ref, packed=packed,
                                          chunk=chunk)
        b = split_bytes(geo, codecs, store.dtype)
        ppl = math.exp(mx.mean(nll).item())
        rows.append({"codec": spec, "family": family_of(spec), **b,
                     "x_vs_fp16": b["fp16_bytes_per_token"] / b["bytes_per_token"],
                     "x_vs_fp16_at_ctx": projection(geo, codecs, store.dtype, [ctx])[0]["x_vs_fp16"],
                     "nll": mx.mean(nll).item(), "ppl": ppl, "kl": mx.mean(kl).item(),
                     "seconds": round(time.time() - t0, 1)})
        r = rows[-1]
        r["dppl_pct"] = 100 * (r["ppl"] / math.exp(mx.mean(ref_nll).item()) - 1)
        print(f"ctx {ctx} {spec:>16}: {r['bytes_per_token']:6d} B/token ({r['x_vs_fp16']:4.2f}x,"
              f" {r['x_vs_fp16_at_ctx']:4.2f}x at ctx)  PPL {ppl:8.3f}  dPPL "
              f"{r['dppl_pct']:+6.2f}%  KL {r['kl']:.5f}  [{r['seconds']}s]", flush=True)
        if on_row is not None:  # partial results survive an interrupted run
            on_row(rows)
    return rows


def _tag(name: str, args) -> str:
    return f"quality_{name.split()[0]}" + ("_quick" if args.quick else "") + args.tag


def merge(paths: list[str], name: str, out: str, tag: str) -> dict:
    """One result from runs over the same windows: the first file's rows, then every later
    file's rows (a later equal spec replaces an earlier one); tables recomputed."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    by_ctx = {}
    for ctx in base["by_ctx"]:
        rows = {}
        for run in runs:
            block = run["by_ctx"].get(ctx)
            if block is None:
                continue
            ref = next(r for r in block["rows"] if r["codec"] == "auto")
            ref0 = next(r for r in base["by_ctx"][ctx]["rows"] if r["codec"] == "auto")
            assert abs(ref["ppl"] - ref0["ppl"]) < 1e-6 * ref0["ppl"], "different windows"
            rows |= {r["codec"]: r for r in block["rows"]}
        rows = list(rows.values())
        by_ctx[ctx] = {"rows": rows, "iso_dppl": iso_table(rows),
                       "iso_dppl_at_ctx": iso_table(rows, "x_vs_fp16_at_ctx")}
    keep = {k: base[k] for k in ("timestamp", "git_revision", "hardware", "versions", "model",
                                 "dtype", "settings")}
    keep["merged_from"] = [Path(p).name for p in paths]
    return finish(keep, name, base["num_layers"], base["geometry"], base["chunk_check"],
                  by_ctx, out, tag)


def finish(h: dict, name: str, num_layers: int, geo: list[dict], check, by_ctx: dict,
           out: str, tag: str) -> dict:
    """Projection, JSON and PNG of the per-window-length rows."""
    main_ctx = by_ctx[max(by_ctx, key=int)]
    proj = {r["codec"]: projection(geo, parse_kv_codec(r["codec"], num_layers, name),
                                   mx.float32, [2048, 32768, 131072]) for r in main_ctx["rows"]}
    result = {**h, "num_layers": num_layers, "geometry": geo, "chunk_check": check,
              "fp16_bytes_per_token": main_ctx["rows"][0]["fp16_bytes_per_token"],
              "rows": main_ctx["rows"], "iso_dppl": main_ctx["iso_dppl"], "by_ctx": by_ctx,
              "projection": proj}
    write_json(tag, result, out)
    series = {}
    for ctx, d in by_ctx.items():
        for r in d["rows"]:
            if r["family"] in ("affine", "lattice", "lloyd", "auto"):
                xs, ys = series.setdefault(f"{r['family']} ({ctx})", ([], []))
                xs.append(r["x_vs_fp16"])
                ys.append(max(r["dppl_pct"], 1e-2))
    for xs, ys in series.values():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs[:], ys[:] = [xs[i] for i in order], [ys[i] for i in order]
    plot(Path(out) / f"{tag}.png", f"KV compression vs dPPL, {name}",
         "x smaller than fp16 (bytes/token, metadata included)", "dPPL % (log)", series,
         log=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ctx", type=int, nargs="+", default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--offset-chars", type=int, default=100_000)
    p.add_argument("--codecs", nargs="+", default=None)
    p.add_argument("--packed", action="store_true", help="store packed codes (slow)")
    p.add_argument("--chunk", type=int, default=256,
                   help="second-half tokens per forward (1: token by token)")
    p.add_argument("--check-ctx", type=int, default=128,
                   help="window of the chunked-vs-token-by-token check (0: skip)")
    p.add_argument("--tag", default="")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge result files of the same model and windows (the first "
                   "one's settings win) into --tag's file")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.merge:
        import json

        name = json.loads(Path(args.merge[0]).read_text())["model"]
        return merge(args.merge, name, args.out, _tag(name, args))
    ctxs = args.ctx or ([16] if args.quick else [1024, 2048])
    num = args.windows or (2 if args.quick else 8)
    codecs = args.codecs or (["auto", "int8", "e8:k4v3"] if args.quick
                             else CODECS)
    if args.quick and not args.model:  # affine codecs need head_dim % 64 == 0
        from mlxkv.models.tiny import make_tiny_model

        loaded = (make_tiny_model("llama", head_dim=64, num_attention_heads=2,
                                  num_key_value_heads=1, hidden_size=128), None)
        name = "tiny-llama (random)"
    else:
        loaded, name = load_model_for(args)
    model = loaded[0] if isinstance(loaded, tuple) else loaded.model
    settings = {"ctx": ctxs, "windows": num, "protocol": "prefill first half in one chunk, "
                f"then the second half teacher-forced through the compressed paged cache, "
                f"{args.chunk} token(s) per forward", "chunk": args.chunk,
                "corpus": "Mansfield Park", "offset_chars": args.offset_chars,
                "storage": "packed" if args.packed else "round trip (same logits as packed)",
                "kl": "top-64 + tail"}
    h = header(name, "float32", settings)
    print_header(h)
    check = None
    if args.check_ctx and args.chunk > 1:
        if args.quick and not args.model:
            cw = [[(7 * i + 3 * j) % 500 + 1 for i in range(args.check_ctx)] for j in range(2)]
        else:
            cw = windows_from_corpus(loaded.tokenizer, args.check_ctx, 2, args.offset_chars)
        check = chunk_check(model, cw, "e8:k5v4", min(args.chunk, args.check_ctx // 4))
        print(f"# chunked vs token-by-token: {check}", flush=True)
    by_ctx = {}
    for ctx in ctxs:
        if args.quick and not args.model:
            windows = [[(7 * i + 3 * j) % 500 + 1 for i in range(ctx)] for j in range(num)]
        else:
            windows = windows_from_corpus(loaded.tokenizer, ctx, num, args.offset_chars)
        def save(rows, ctx=ctx):
            by_ctx[str(ctx)] = {"rows": rows, "iso_dppl": iso_table(rows),
                                "iso_dppl_at_ctx": iso_table(rows, "x_vs_fp16_at_ctx")}
            finish(h, name, len(model.layers), geometry(model), check, by_ctx, args.out,
                   _tag(name, args))

        rows = evaluate(model, name, codecs, windows, args.packed, args.chunk, save)
        by_ctx[str(ctx)] = {"rows": rows, "iso_dppl": iso_table(rows),
                            "iso_dppl_at_ctx": iso_table(rows, "x_vs_fp16_at_ctx")}
    return finish(h, name, len(model.layers), geometry(model), check, by_ctx, args.out,
                  _tag(name, args))


if __name__ == "__main__":
    main()
