"""Results of benchmarks/quality.py: iso-dPPL tables, per-window-length blocks, merging
partial runs, the JSON (with whole-model projections) and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from _common import plot, write_json
from _kvbytes import projection

from mlxkv.codec import parse_kv_codec

FAMILIES = ("affine", "lloyd", "lattice", "auto_lloyd", "auto")


def iso_table(rows: list[dict], key: str = "x_vs_fp16") -> list[dict]:
    """Per dPPL target, the cheapest codec within it (overall and per family)."""
    out = []
    for target in (0.5, 1.0, 2.0):
        entry = {"dppl_target_pct": target}
        for fam in (None, *FAMILIES):
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
    """affine | lloyd | lattice (uniform rates) | auto (E8/D4 allocation) | auto_lloyd
    (the allocation with Lloyd-Max codes) | full."""
    head, *opts = spec.split(",")
    if head.startswith("auto:"):
        return "auto_lloyd" if "family=lloyd" in opts else "auto"
    if head.startswith(("e8", "d4")):
        return "lattice"
    if head.startswith("lloyd"):
        return "lloyd"
    return "affine" if head.startswith("int") else "full"


def ctx_block(rows: list[dict], windows: int, chunk: int) -> dict:
    """One window length's results: rows, the n and chunk they used, iso-dPPL tables."""
    rows = [{**r, "family": family_of(r["codec"])} for r in rows]
    return {"rows": rows, "windows": windows, "chunk": chunk, "iso_dppl": iso_table(rows),
            "iso_dppl_at_ctx": iso_table(rows, "x_vs_fp16_at_ctx")}


def merge(paths: list[str], name: str, out: str, tag: str) -> dict:
    """One result from runs of the same model: per window length, every run's rows in file
    order (a later equal spec replaces an earlier one); tables recomputed. Runs of one
    window length must share their windows and chunking (their references' PPL must
    agree); a file without rows (`--check-only`) contributes its chunk_check."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = next(run for run in runs if run["by_ctx"])
    by_ctx = {}
    for ctx in sorted({c for run in runs for c in run["by_ctx"]}, key=int):
        rows, ref0, meta = {}, None, None
        for run in runs:
            block = run["by_ctx"].get(ctx)
            if block is None:
                continue
            ref = next(r for r in block["rows"] if r["codec"] == "auto")
            ref0 = ref0 or ref
            assert abs(ref["ppl"] - ref0["ppl"]) < 1e-6 * ref0["ppl"], f"different windows at {ctx}"
            rows |= {r["codec"]: r for r in block["rows"]}
            meta = meta or (block.get("windows", run["settings"]["windows"]),
                            block.get("chunk", run["settings"]["chunk"]))
        by_ctx[ctx] = ctx_block(list(rows.values()), *meta)
    keep = {k: base[k] for k in ("timestamp", "git_revision", "hardware", "versions", "model",
                                 "dtype", "settings")}
    keep["settings"] = {**keep["settings"], "ctx": [int(c) for c in by_ctx],
                        "windows": {c: b["windows"] for c, b in by_ctx.items()}}
    keep["merged_from"] = [Path(p).name for p in paths]
    keep["commands"] = [c for run in runs for c in run.get("commands")
                        or [run["settings"].get("command", "?")]]
    keep["git_revisions"] = sorted({run["git_revision"] for run in runs})
    check = next((run["chunk_check"] for run in reversed(runs)
                  if run.get("chunk_check")), None)
    return finish(keep, name, base["num_layers"], base["geometry"], check, by_ctx, out, tag)


def finish(h: dict, name: str, num_layers: int, geo: list[dict], check, by_ctx: dict,
           out: str, tag: str) -> dict:
    """Projection, JSON and PNG of the per-window-length rows (the top-level rows and
    iso-dPPL table are 2,048-token windows' when measured, else the longest's)."""
    main_ctx = by_ctx.get("2048") or by_ctx[max(by_ctx, key=int)] if by_ctx else None
    specs = list(dict.fromkeys(r["codec"] for d in by_ctx.values() for r in d["rows"]))
    proj = {c: projection(geo, parse_kv_codec(c, num_layers, name), mx.float32,
                          [2048, 32768, 131072]) for c in specs}
    result = {**h, "num_layers": num_layers, "geometry": geo, "chunk_check": check,
              "fp16_bytes_per_token": main_ctx and main_ctx["rows"][0]["fp16_bytes_per_token"],
              "rows": main_ctx and main_ctx["rows"], "iso_dppl": main_ctx and main_ctx["iso_dppl"],
              "by_ctx": by_ctx, "projection": proj}
    write_json(tag, result, out)
    if by_ctx:
        _plot(Path(out) / f"{tag}.png", name, by_ctx)
    return result


def _plot(path: Path, name: str, by_ctx: dict) -> None:
    series = {}
    for ctx, d in by_ctx.items():
        for r in d["rows"]:
            if r["family"] in FAMILIES:
                xs, ys = series.setdefault(f"{r['family']} ({ctx})", ([], []))
                xs.append(r["x_vs_fp16"])
                ys.append(max(r["dppl_pct"], 1e-2))
    for xs, ys in series.values():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs[:], ys[:] = [xs[i] for i in order], [ys[i] for i in order]
    plot(path, f"KV compression vs dPPL, {name}",
         "x smaller than fp16 (bytes/token, metadata included)", "dPPL % (log)", series,
         log=True)
