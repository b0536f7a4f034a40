"""Markdown tables of docs/compression.md, rendered from the quality and capacity JSON."""

from __future__ import annotations

FAMILIES = (("affine", "affine int (mlx-lm)"),
            ("lloyd", "rotation + Lloyd-Max (TurboQuant-style)"),
            ("auto_lloyd", "Lloyd-Max, per-layer allocation"),
            ("lattice", "E8/D4 lattice"), ("auto", "E8, per-layer allocation (auto:Rx)"))
LATTICE, TURBO = ("lattice", "auto"), ("lloyd", "auto_lloyd")


def _src(d: dict, cmd: str, name: str) -> str:
    cpu = d.get("hardware", {}).get("cpu", "?")
    return (f"`python benchmarks/{cmd}` (git {d['git_revision']}, {d['timestamp'][:10]}, "
            f"{cpu}; results/{name}.json)")


def _short(cmd: str) -> str:
    """A quality.py command line without this machine's paths."""
    import re

    cmd = re.sub(r" --out \S+", "", cmd)
    return re.sub(r"--ref-cache \S+", "--ref-cache DIR", cmd)


def table_quality(d: dict, name: str) -> list[str]:
    if "by_ctx" not in d:  # a result from before per-window-length runs
        d = {**d, "by_ctx": {str(d["settings"]["ctx"]): {"rows": [
            {**r, "x_vs_fp16_at_ctx": r["x_vs_fp16"]} for r in d["rows"]]}},
             "settings": {**d["settings"], "ctx": [d["settings"]["ctx"]]}}
    s = d["settings"]
    cmds = d.get("commands") or [s.get("command") or
                                 f"--model {d['model']} --ctx {' '.join(map(str, s['ctx']))} "
                                 f"--windows {s['windows']}"]
    cmds = [_short(c) for c in cmds]
    out = [_src(d, f"quality.py {cmds[0]}", name), ""]
    if len(cmds) > 1:
        out += ["merged (`--merge`) with " + "; ".join(f"`{c}`" for c in cmds[1:])
                + f" (git {', '.join(d.get('git_revisions', []))})", ""]
    for ctx, block in d["by_ctx"].items():
        n = block.get("windows", s["windows"])
        out += [f"Windows of {ctx} tokens, n = {n} (chunk {block.get('chunk', s.get('chunk'))}):",
                "", "| codec | KV bytes/token | vs fp16 | vs fp16, whole model at this window |"
                " PPL | dPPL | +- s.e. | KL | s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(block["rows"], key=lambda r: (-r["bytes_per_token"], r["codec"])):
            se = f"{r['dppl_se_pct']:.2f}" if "dppl_se_pct" in r else "-"
            out.append(f"| `{r['codec']}` | {r['bytes_per_token']} | {r['x_vs_fp16']:.2f}x | "
                       f"{r['x_vs_fp16_at_ctx']:.2f}x | {r['ppl']:.3f} | "
                       f"{r['dppl_pct']:+.2f}% | {se} | {r['kl']:.4f} | {r.get('seconds') or '-'} |")
        out.append("")
    return out


def _verdict(t: dict) -> str:
    """Lattice family (E8 uniform or allocated) vs TurboQuant-style (Lloyd-Max uniform or
    allocated) vs affine int at one threshold: the most compression each reaches."""
    def best(fams):
        return max((t.get(f"{f}_x_vs_fp16") or 0.0) for f in fams)

    lat, tq, aff = best(LATTICE), best(TURBO), best(("affine",))
    if not lat and not tq:
        return f"affine {aff:.2f}x only" if aff else "none within"
    order = sorted([("lattice", lat), ("TurboQuant-style", tq), ("affine", aff)],
                   key=lambda p: -p[1])
    parts = [f"{n} {x:.2f}x" if x else f"{n} none" for n, x in order]
    return " > ".join(parts) if order[0][1] != order[1][1] else " = ".join(parts[:2]) + \
        " > " + parts[2]


def table_iso(named: dict[str, dict], ctxs: tuple[str, ...] = ("2048",)) -> list[str]:
    """Iso-dPPL: per model, window length and threshold, the cheapest codec overall and per
    family, and which family reaches the most compression (bytes per token vs fp16)."""
    head = ("| model | window, n | dPPL <= | best | " + " | ".join(label for _, label in FAMILIES)
            + " | most compression |")
    out = [head, "|---|---|---:|---|" + "---|" * len(FAMILIES) + "---|"]
    for ctx in ctxs:
        for model, d in named.items():
            block = d["by_ctx"].get(ctx)
            if block is None:
                continue
            n = block.get("windows", d["settings"].get("windows"))
            for t in block["iso_dppl"]:
                cells = []
                for fam, _ in FAMILIES:
                    c = t.get(f"{fam}_codec")
                    cells.append(f"`{c}` {t[f'{fam}_x_vs_fp16']:.2f}x" if c else "none")
                best = f"`{t['codec']}` **{t['x_vs_fp16']:.2f}x**" if t["codec"] else "none"
                out.append(f"| {model} | {int(ctx) // 1024}k, {n} | {t['dppl_target_pct']}% | "
                           f"{best} | " + " | ".join(cells) + f" | {_verdict(t)} |")
    return out


def table_projection(named: dict[str, dict], codecs: dict[str, list[str]]) -> list[str]:
    """Whole-model KV bytes of one sequence at 2k/32k/128k (MiB, split full / sliding)."""
    out = ["| model | codec | 2k MiB (full + sliding) | 32k MiB | 128k MiB | vs fp16 at 128k |",
           "|---|---|---:|---:|---:|---:|"]
    for model, d in named.items():
        fp16 = d["projection"]["auto"]
        rows = [("fp16", [{"bytes": p["fp16_bytes"], "bytes_full_layers": None} for p in fp16],
                 1.0)]
        for c in codecs.get(model, []):
            if c in d["projection"]:
                rows.append((f"`{c}`", d["projection"][c], d["projection"][c][-1]["x_vs_fp16"]))
        for label, proj, x in rows:
            cells = []
            for p in proj:
                mib = p["bytes"] / 2**20
                if p.get("bytes_full_layers") is not None and p["bytes_sliding_layers"]:
                    cells.append(f"{mib:.1f} ({p['bytes_full_layers'] / 2**20:.1f} + "
                                 f"{p['bytes_sliding_layers'] / 2**20:.1f})")
                else:
                    cells.append(f"{mib:.1f}")
            out.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {x:.2f}x |")
    return out


def table_capacity(d: dict) -> list[str]:
    s = d["settings"]
    flags = "" if s.get("engine_run", True) else " --no-run"
    cmd = f"capacity.py{flags} --budget-mib {s['budget_mib']:g} --seq-len {s['seq_len']}"
    out = [_src(d, cmd, "capacity"), "",
           f"KV budget {s['budget_mib']:g} MiB, {s['seq_len']}-token sequences:", "",
           "| codec | bytes/token | sequences admitted | x vs first | preemptions at N / N+1 |"
           " peak running | decode tok/s at N |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in d["rows"]:
        if "at_admitted" not in r:
            out.append(f"| `{r['codec']}` | {r['bytes_per_token']} | {r['admitted']} | "
                       f"{r['x_sequences_vs_first']:.2f}x | not run | - | - |")
            continue
        a, b = r["at_admitted"], r["at_admitted_plus_one"]
        tok = f"{a['decode_tok_s']:.1f}" if a["decode_tok_s"] else "-"
        out.append(f"| `{r['codec']}` | {r['bytes_per_token']} | {r['admitted']} | "
                   f"{r['x_sequences_vs_first']:.2f}x | {a['preemptions']} / {b['preemptions']} |"
                   f" {a['peak_running']} | {tok} |")
    return out


def table_fit_steps(d: dict) -> list[str]:
    """Fitted step constants and the relative MSE on captured K/V, per family and rate."""
    by = {(r["family"], r["bits"]): r for r in d["rows"]}
    out = [_src(d, "fit_steps.py", "fit_steps"), "",
           "| bits/coord | E8 step | E8 rel. MSE | D4 step | D4 rel. MSE | Lloyd-Max gain |"
           " Lloyd-Max rel. MSE |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({b for _, b in by}):
        e, d4, lm = by[("e8", m)], by[("d4", m)], by[("lloyd", m)]
        out.append(f"| {m} | {e['constant']:.4f} | {e['rel_mse']:.2e} | {d4['constant']:.4f} | "
                   f"{d4['rel_mse']:.2e} | {lm['constant']:.4f} | {lm['rel_mse']:.2e} |")
    return out


PAIRS = (("auto:3.0x", "auto:3.0x,family=lloyd"), ("auto:3.5x", "auto:3.5x,family=lloyd"),
         ("e8:k5v5", "lloyd:k5v5"), ("e8:k6v6", "lloyd:k6v6"))


def _paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error over windows of the log-PPL difference a - b (in %)."""
    import math

    diff = [math.log1p(x / 100) - math.log1p(y / 100)
            for x, y in zip(a["dppl_pct_by_window"], b["dppl_pct_by_window"], strict=True)]
    mean = sum(diff) / len(diff)
    var = sum((d - mean) ** 2 for d in diff) / max(len(diff) - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / len(diff))


def table_pairs(named: dict[str, dict]) -> list[str]:
    """E8 lattice vs rotation + Lloyd-Max at the same bytes (same rates), paired by window."""
    out = ["| model | window, n | bytes/token | E8 | dPPL | KL | Lloyd-Max | dPPL | KL |"
           " E8 - Lloyd-Max (paired, +- s.e.) |", "|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for model, d in named.items():
        for ctx, block in d["by_ctx"].items():
            rows = {r["codec"]: r for r in block["rows"]}
            for e8, lm in PAIRS:
                a, b = rows.get(e8), rows.get(lm)
                if a is None or b is None or "dppl_pct_by_window" not in a:
                    continue
                mean, se = _paired(a, b)
                out.append(f"| {model} | {int(ctx) // 1024}k, {block.get('windows')} | "
                           f"{a['bytes_per_token']} | `{e8}` | {a['dppl_pct']:+.2f}% | "
                           f"{a['kl']:.4f} | `{lm}` | {b['dppl_pct']:+.2f}% | {b['kl']:.4f} | "
                           f"{mean:+.2f}% +- {se:.2f} |")
    return out
