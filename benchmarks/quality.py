"""Compressed-KV quality: dPPL and KL vs the uncompressed cache, errors compounding in decode.

For each codec spec and window length, N windows of the Jane Austen corpus go through
mlxkv's paged data plane: the first half of each window is prefilled in one chunk, the
second half is teacher-forced through the paged cache `--chunk` tokens per forward (all
windows batched; `--chunk 1` is token by token), so every scored token reads K/V that
went through the codec, including K/V written after the prefill. Scored: the second
half's next-token NLL; KL(uncompressed || compressed) over the same positions, on the
reference's top-64 tokens plus the tail mass (mlxkv.kv_profile.TopKReference); the
standard error of the dPPL over windows. The LM head runs on slices of at most
`--score-mib` of logits, so memory does not grow with windows x chunk x vocab.

By default the pools hold each codec's round trip (mlxkv.codec.roundtrip: the values any
decode of the packed layout yields, tests/codec/test_roundtrip.py), so the compiled CPU
decode attention reads them; `--packed` stores the packed layout and decodes on every
read (same logits, far slower). Bytes are the packed codec's, metadata included.
`chunk_check` (`--check-*`) runs one codec both token by token and chunked on the same
windows and records both dPPLs; `--merge` combines partial runs (`--tag`).

    python benchmarks/quality.py --model smollm2-135m-instruct --ctx 1024 2048
    python benchmarks/quality.py --quick          # tiny random model, random tokens
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from _common import RESULTS, header, load_model_for, print_header  # first: BLAS

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
from _quality_results import ctx_block, family_of, finish, merge  # noqa: E402

# issue #16's set: affine, uniform E8 and Lloyd-Max, and one allocation in both families
CODECS = ["auto", "int8", "int6", "int4", "e8:k6v6", "e8:k5v5", "lloyd:k6v6", "lloyd:k5v5",
          "auto:3.0x", "auto:3.0x,family=lloyd", "auto:3.5x", "auto:3.5x,family=lloyd"]


def windows_from_corpus(tokenizer, ctx: int, num: int, offset_chars: int) -> list[list[int]]:
    from _corpus import austen

    ids = tokenizer.encode(austen("mansfieldpark")[offset_chars:offset_chars + ctx * num * 8])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:  # the tokenizer adds BOS: every window gets one
        ids = ids[1:]
        return [[bos] + ids[i * (ctx - 1) : (i + 1) * (ctx - 1)] for i in range(num)]
    return [ids[i * ctx : (i + 1) * ctx] for i in range(num)]


def _scores(logits, targets, ref_rows):
    """(nll [rows], kl [rows] or None, TopKReference or None) of logits [rows, vocab]."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if ref_rows is None:
        return nll, None, TopKReference.of(logits)
    return nll, ref_rows.kl(logits), None


def _ref_rows(ref: TopKReference, a: int, b: int) -> TopKReference:
    return TopKReference(ref.ids[a:b], ref.logp[a:b], ref.tail[a:b])


def _ref_concat(refs: list[TopKReference]) -> TopKReference:
    return TopKReference(*(mx.concatenate([getattr(r, f) for r in refs], axis=0)
                           for f in ("ids", "logp", "tail")))


def score_rows(runner, hidden, targets, ref, score_mib: float):
    """nll [rows], and kl [rows] against `ref` (or, when `ref` is None, the rows'
    TopKReference) of final hidden states [rows, hidden_size] and targets [rows].

    The LM head runs on slices of rows so that one slice's fp32 logits stay under
    `score_mib` MiB: [rows, vocab] is never materialised whole (Gemma-3's 262k vocab makes
    2,048 rows 2 GiB, and scoring takes a few such arrays).
    """
    vocab = runner.logits_of(hidden[:1]).shape[-1]  # shape inference only, nothing runs
    step = max(1, int(score_mib * 2**20) // (4 * vocab))
    nlls, kls, refs = [], [], []
    for a in range(0, hidden.shape[0], step):
        b = min(a + step, hidden.shape[0])
        nll, kl, r = _scores(runner.logits_of(hidden[a:b]), targets[a:b],
                             None if ref is None else _ref_rows(ref, a, b))
        mx.eval(nll) if kl is None else mx.eval(nll, kl)
        nlls.append(nll), kls.append(kl), refs.append(r)
    nll = mx.concatenate(nlls)
    if ref is None:
        return nll, None, _ref_concat(refs)
    return nll, mx.concatenate(kls), None


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
              chunk: int = 1, score_mib: float = 256.0):
    """Scores of the second halves: nll and kl [N, scored], the store, and (when `ref` is
    None) the per-chunk TopKReference list to score later codecs against.

    The first half is prefilled in one chunk; the second half goes through the paged cache
    `chunk` tokens per forward (1: token by token). Teacher-forced, every chunk size reads
    the same coded K/V (each token's K/V are written, coded, before any query reads them),
    so the logits agree to fp32 noise (tests/codec/test_roundtrip.py, and `chunk_check` in
    this script's JSON); larger chunks only save forwards. Logits are scored in slices
    (`score_rows`), so peak memory does not grow with windows x chunk x vocab.
    """
    groups = group_specs_for(model)
    num, ctx = len(windows), len(windows[0])
    blocks = [num * (ctx // block_size + 2) + 1] * len(groups)
    codecs = layer_codecs if packed else round_trip_layers(layer_codecs)
    store = KVStore(groups, blocks, block_size, mx.float32, codecs)
    cache = KVCacheManager(groups, blocks, block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, store, None if packed else default_decode_op())
    half, all_ids = ctx // 2, mx.array(windows)
    for i, w in enumerate(windows):
        cache.lookup(str(i), w)
    # the prefill's last hidden state predicts token `half`; a chunk over [a, b) predicts
    # a+1..b; rows are window-major ([num, rows per window] flattened)
    hidden = runner.forward_hidden(_chunk_batch(cache, windows, 0, half, False))
    nlls, kls, refs = [], [], []
    pos = half  # the next token to score
    while True:
        mx.eval(hidden, store.arrays())
        width = hidden.shape[0] // num
        targets = all_ids[:, pos:pos + width].reshape(-1)
        nll, kl, r = score_rows(runner, hidden, targets, None if ref is None else ref[len(nlls)],
                                score_mib)
        nlls.append(nll.reshape(num, width)), refs.append(r)
        kls.append(None if kl is None else kl.reshape(num, width))
        pos += width
        if pos >= ctx:
            break
        start, end = pos - 1, min(ctx - 1, pos - 1 + chunk)
        hidden = runner.forward_hidden(_chunk_batch(cache, windows, start, end, True))
    kl = None if ref is None else mx.concatenate(kls, axis=1)
    return mx.concatenate(nlls, axis=1), kl, store, (refs if ref is None else None)


def chunk_check(model, windows, spec: str, chunk: int, score_mib: float = 256.0) -> dict:
    """Token-by-token decode vs `chunk` tokens per forward, on the same windows: the largest
    per-token |difference| of NLL and KL, and the codec's dPPL either way (what the
    measurement reports; single tokens differ by fp32 summation order, see the doc)."""
    codecs = parse_kv_codec(spec, len(model.layers))
    kw = {"score_mib": score_mib}
    one = run_codec(model, None, windows, chunk=1, **kw)
    many = run_codec(model, None, windows, chunk=chunk, **kw)
    a = run_codec(model, codecs, windows, one[3], chunk=1, **kw)
    b = run_codec(model, codecs, windows, many[3], chunk=chunk, **kw)

    def dppl(codec_nll, ref_nll):
        return 100 * (math.exp(mx.mean(codec_nll).item() - mx.mean(ref_nll).item()) - 1)

    return {"spec": spec, "ctx": len(windows[0]), "windows": len(windows), "chunk": chunk,
            "max_abs_nll_diff": mx.max(mx.abs(a[0] - b[0])).item(),
            "max_abs_kl_diff": mx.max(mx.abs(a[1] - b[1])).item(),
            "mean_nll_token_by_token": mx.mean(a[0]).item(), "mean_nll_chunked": mx.mean(b[0]).item(),
            "ref_mean_nll_token_by_token": mx.mean(one[0]).item(),
            "ref_mean_nll_chunked": mx.mean(many[0]).item(),
            "dppl_pct_token_by_token": dppl(a[0], one[0]), "dppl_pct_chunked": dppl(b[0], many[0]),
            "kl_token_by_token": mx.mean(a[1]).item(), "kl_chunked": mx.mean(b[1]).item()}


def window_spread(nll, ref_nll) -> dict:
    """Per-window dPPL (%) and the standard error of the mean log-PPL ratio across windows
    (in %, ~ the dPPL's; 0 for one window): how far n windows pin the dPPL down."""
    diff = (mx.mean(nll, axis=1) - mx.mean(ref_nll, axis=1)).tolist()  # [N] nats
    num = len(diff)
    mean = sum(diff) / num
    var = sum((d - mean) ** 2 for d in diff) / (num - 1) if num > 1 else 0.0
    return {"dppl_pct_by_window": [100 * math.expm1(d) for d in diff],
            "dppl_se_pct": 100 * math.sqrt(var / num)}


def reference(model, name, windows, packed, chunk, score_mib, cache_dir=None):
    """The uncompressed run: nll [N, T], the per-chunk TopKReference list and its seconds.

    With `cache_dir`, loaded from / saved to a file keyed by the model, the windows' token
    ids, the chunking and the storage, so runs split over several invocations (`--tag`,
    then `--merge`) compute it once.
    """
    import hashlib
    import json

    key = hashlib.sha1(json.dumps([name, windows, chunk, packed]).encode()).hexdigest()[:16]
    path = Path(cache_dir or ".") / f"ref_{key}.safetensors"
    if cache_dir and path.is_file():
        arrays = mx.load(str(path))
        refs = [TopKReference(arrays[f"ids{i}"], arrays[f"logp{i}"], arrays[f"tail{i}"])
                for i in range(len(arrays) // 3)]
        return arrays["nll"], refs, 0.0
    t0 = time.time()
    ref_nll, _, _, refs = run_codec(model, None, windows, packed=packed, chunk=chunk,
                                    score_mib=score_mib)
    seconds = round(time.time() - t0, 1)
    if cache_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"nll": ref_nll}
        for i, r in enumerate(refs):
            arrays |= {f"ids{i}": r.ids, f"logp{i}": r.logp, f"tail{i}": r.tail}
        mx.save_safetensors(str(path), arrays)
    return ref_nll, refs, seconds


def evaluate(model, name, specs, windows, packed, chunk, on_row=None,
             score_mib: float = 256.0, ref_cache: str | None = None) -> list[dict]:
    geo = geometry(model)
    ctx = len(windows[0])
    mx.reset_peak_memory()
    ref_nll, ref, ref_seconds = reference(model, name, windows, packed, chunk, score_mib,
                                          ref_cache)
    rows = []
    for spec in specs:
        t0 = time.time()
        if spec != "auto":  # the auto row reports the reference run's peak
            mx.reset_peak_memory()
        codecs = parse_kv_codec(spec, len(model.layers), model_name=name)
        if spec == "auto":
            nll, kl = ref_nll, mx.zeros(ref_nll.shape)
        else:
            nll, kl, _, _ = run_codec(model, codecs, windows, ref, packed=packed, chunk=chunk,
                                      score_mib=score_mib)
        b = split_bytes(geo, codecs, mx.float32)  # the stores' dtype (run_codec)
        ppl = math.exp(mx.mean(nll).item())
        rows.append({"codec": spec, "family": family_of(spec), **b,
                     "x_vs_fp16": b["fp16_bytes_per_token"] / b["bytes_per_token"],
                     "x_vs_fp16_at_ctx": projection(geo, codecs, mx.float32, [ctx])[0]["x_vs_fp16"],
                     "nll": mx.mean(nll).item(), "ppl": ppl, "kl": mx.mean(kl).item(),
                     "seconds": ref_seconds if spec == "auto" else round(time.time() - t0, 1),
                     "peak_mib": round(mx.get_peak_memory() / 2**20)})
        r = rows[-1]
        r["dppl_pct"] = 100 * (r["ppl"] / math.exp(mx.mean(ref_nll).item()) - 1)
        r |= window_spread(nll, ref_nll)
        r["kl_by_window"] = mx.mean(kl, axis=1).tolist()
        print(f"ctx {ctx} {spec:>16}: {r['bytes_per_token']:6d} B/token ({r['x_vs_fp16']:4.2f}x,"
              f" {r['x_vs_fp16_at_ctx']:4.2f}x at ctx)  PPL {ppl:8.3f}  dPPL "
              f"{r['dppl_pct']:+6.2f}% (se {r['dppl_se_pct']:.2f})  KL {r['kl']:.5f}  "
              f"[{r['seconds']}s, peak {r['peak_mib']} MiB]", flush=True)
        if on_row is not None:  # partial results survive an interrupted run
            on_row(rows)
    return rows


def _tag(name: str, args) -> str:
    return f"quality_{name.split()[0]}" + ("_quick" if args.quick else "") + args.tag


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
    p.add_argument("--check-windows", type=int, default=2)
    p.add_argument("--check-spec", default="e8:k5v4")
    p.add_argument("--check-only", action="store_true",
                   help="run only that check (its JSON merges into a result's chunk_check)")
    p.add_argument("--check-chunk", type=int, default=None,
                   help="chunk of that check (default: --chunk, at most a quarter window)")
    p.add_argument("--score-mib", type=float, default=256.0,
                   help="largest fp32 logits slice scored at once (bounds peak memory)")
    p.add_argument("--cache-mib", type=float, default=512.0,
                   help="MLX buffer-cache limit (peak RSS ~ live arrays + this)")
    p.add_argument("--ref-cache", default=None, metavar="DIR",
                   help="keep the uncompressed run's scores here, shared by later runs")
    p.add_argument("--tag", default="")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge result files of the same model and windows (the first "
                   "one's settings win) into --tag's file")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    # NOTE: freed buffers beyond this go back to the OS: without a limit MLX's buffer cache
    # kept Gemma-3's RSS near 8 GiB although the arrays alive at once stay far smaller.
    mx.set_cache_limit(int(args.cache_mib * 2**20))
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
    settings = {"command": " ".join(argv if argv is not None else sys.argv[1:]),
                "ctx": ctxs, "windows": num, "protocol": "prefill first half in one chunk, "
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
            cw = [[(7 * i + 3 * j) % 500 + 1 for i in range(args.check_ctx)]
                  for j in range(args.check_windows)]
        else:
            cw = windows_from_corpus(loaded.tokenizer, args.check_ctx, args.check_windows,
                                     args.offset_chars)
        check = chunk_check(model, cw, args.check_spec,
                            args.check_chunk or min(args.chunk, args.check_ctx // 4),
                            args.score_mib)
        print(f"# chunked vs token-by-token: {check}", flush=True)
    if args.check_only:
        return finish(h, name, len(model.layers), geometry(model), check, {}, args.out,
                      _tag(name, args))
    by_ctx = {}
    for ctx in ctxs:
        if args.quick and not args.model:
            windows = [[(7 * i + 3 * j) % 500 + 1 for i in range(ctx)] for j in range(num)]
        else:
            windows = windows_from_corpus(loaded.tokenizer, ctx, num, args.offset_chars)
        def save(rows, ctx=ctx):
            by_ctx[str(ctx)] = ctx_block(rows, num, args.chunk)
            finish(h, name, len(model.layers), geometry(model), check, by_ctx, args.out,
                   _tag(name, args))

        rows = evaluate(model, name, codecs, windows, args.packed, args.chunk, save,
                        args.score_mib, args.ref_cache)
        by_ctx[str(ctx)] = ctx_block(rows, num, args.chunk)
    return finish(h, name, len(model.layers), geometry(model), check, by_ctx, args.out,
                  _tag(name, args))


if __name__ == "__main__":
    main()
