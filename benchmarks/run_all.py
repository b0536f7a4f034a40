"""Run every benchmark and rewrite the tables in docs/ from their JSON (one command).

    python benchmarks/run_all.py              # full runs (tens of minutes on a 2-core CPU)
    python benchmarks/run_all.py --render     # only re-render docs from benchmarks/results/
    python benchmarks/run_all.py --quick      # quick modes (results in benchmarks/results/quick)

Tables live between `<!-- BEGIN name -->` and `<!-- END name -->` markers in
docs/benchmarks.md and docs/compression.md; nothing outside the markers is touched.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from _compression_tables import (
    table_capacity,
    table_fit_steps,
    table_iso,
    table_pairs,
    table_projection,
    table_quality,
)

HERE = Path(__file__).parent
DOCS = HERE.parent / "docs"
RUNS = [
    ["bench_throughput.py"],
    ["quality.py", "--model", "smollm2-135m-instruct", "--ctx", "2048", "--windows", "8"],
    ["quality.py", "--model", "gemma3-270m", "--ctx", "2048", "--windows", "8"],
    ["capacity.py"],
    ["bench_server.py"],
    ["bench_chat.py"],
    ["shared_prefix.py", "--model", "smollm2-135m-instruct"],
    ["paged_vs_dense.py", "--model", "smollm2-135m-instruct"],
    ["floor.py", "--model", "smollm2-135m-instruct"],
    ["bench_kernels.py"],
    ["step_profile.py"],
    ["bench_speculative.py"],
]


def _load(name: str, results: Path) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _src(d: dict, cmd: str, name: str) -> str:
    cpu = d.get("hardware", {}).get("cpu", "?")
    return (f"`python benchmarks/{cmd}` (git {d['git_revision']}, {d['timestamp'][:10]}, "
            f"{cpu}; results/{name}.json)")


def table_throughput(d, name="throughput"):
    s = d["settings"]
    mxl = any("mlxkv_mx_linear_tok_s" in r for r in d["rows"])
    rows = [f"{s['prompt_len']}-token prompts, {s['max_tokens']} generated tokens, median of "
            f"{s['repeats']}", "",
            "| concurrent | mlxkv tok/s |" + (" mlxkv, MLX matmul tok/s |" if mxl else "")
            + " mlx-lm BatchGenerator tok/s | ratio | mlx-lm generate tok/s | ratio |",
            "|---:|---:|" + ("---:|" if mxl else "") + "---:|---:|---:|---:|"]
    for r in d["rows"]:
        single = (f"{r['mlx_lm_generate_tok_s']:.1f} | {r['ratio_generate']:.2f}"
                  if "mlx_lm_generate_tok_s" in r else "- | -")
        other = f" {r.get('mlxkv_mx_linear_tok_s', float('nan')):.1f} |" if mxl else ""
        rows.append(f"| {r['concurrency']} | {r['mlxkv_tok_s']:.1f} |{other} "
                    f"{r['mlx_lm_tok_s']:.1f} | {r['ratio']:.2f} | {single} |")
    return [_src(d, "bench_throughput.py", name), ""] + rows


def table_step_profile(d):
    rows = ["| model | seqs x context | side | schedule | build | graph | update | detok | "
            "host | wait | wall |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        for side in ("before", "after-sync", "after"):
            m = r[side]
            rows.append(f"| {r['model'].split('-')[0]} | {r['seqs']} x {r['context']} | {side} | "
                        + " | ".join(f"{m[k]:.2f}" for k in ("schedule", "build", "graph",
                                                             "update", "detok", "host", "wait",
                                                             "wall")) + " |")
    crit = ["", "| model | seqs x context | host before | host after | critical-path host "
            "after | of the step |", "|---|---|---:|---:|---:|---:|"]
    crit += [f"| {r['model'].split('-')[0]} | {r['seqs']} x {r['context']} | "
             f"{r['before']['host']:.2f} | {r['after']['host']:.2f} | "
             f"{r['critical_host_ms']:.2f} | {100 * r['critical_host_frac']:.0f}% |"
             for r in d["rows"]]
    return [_src(d, "step_profile.py", "step_profile"), "", "ms per decode step", "", *rows,
            *crit]


def table_server(d):
    rows = ["| server | clients | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, rs in d["results"].items():
        rows += [f"| {label} | {r['concurrency']} | {r['tok_s']:.1f} | {r['ttft_p50'] * 1e3:.0f}"
                 f" / {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} / "
                 f"{r['itl_p99'] * 1e3:.1f} | {r['errors']} |" for r in rs]
    return [_src(d, "bench_server.py", "server"), "", *rows]


def table_shared(d):
    mib = 2**20
    rows = ["| | tokens stored | KV bytes stored | overhead | prefill tokens | TTFT leader | "
            "TTFT followers (median) |", "|---|---:|---:|---|---:|---:|---:|"]
    sides = (("mlxkv (shared blocks)", "mlxkv"),
             (f"mlx-lm (`LRUPromptCache`, {d['mlx_lm'].get('entries_held', '?')} entries)",
              "mlx_lm"))
    for label, key in sides:
        r = d[key]
        over = r["overhead"]
        if key == "mlxkv":
            text = (f"{over['block_slack_bytes'] / mib:.1f} MiB tail-block slack; "
                    f"{over['unused_pool_bytes'] / mib:.0f} MiB unused pool")
        else:
            text = f"{over['padded_capacity_bytes'] / mib:.1f} MiB 256-step padding"
        rows.append(f"| {label} | {r['tokens_stored']} | {r['kv_bytes_stored'] / mib:.1f} MiB "
                    f"| {text} | {r['prefill_tokens']} | {r['ttft_first_s'] * 1e3:.0f} ms | "
                    f"{r['ttft_followers_median_s'] * 1e3:.0f} ms |")
    return [_src(d, f"shared_prefix.py --model {d['model']}", "shared_prefix"), "", *rows]


def table_pvd(d, name="paged_vs_dense"):
    st = d.get("settings", {})
    codecs = st.get("codecs", [])
    head = "| batch | context | paged tok/s | dense tok/s | paged / dense |"
    head += " reference / dense |" if any("ref_ratio" in r for r in d["rows"]) else ""
    mxl = any("mx_linear_ratio" in r for r in d["rows"])
    head += " paged, MLX matmul tok/s | paged, MLX matmul / dense |" if mxl else ""
    head += "".join(f" `{c}` / fp pool |" for c in codecs)
    rows = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in d["rows"]:
        line = (f"| {r['batch']} | {r['context']} | {r['paged_tok_s']:.1f} | "
                f"{r['dense_tok_s']:.1f} | {r['ratio']:.2f} |")
        line += f" {r['ref_ratio']:.2f} |" if "ref_ratio" in r else ""
        if mxl:
            line += f" {r['paged_mx_linear_tok_s']:.1f} | {r['mx_linear_ratio']:.2f} |"
        line += "".join(f" {r['codecs'][c]['vs_fp']:.2f} |" for c in codecs)
        rows.append(line)
    note = (f"Attention `{st.get('auto_attention', '?')}`, linear layers "
            f"`{st.get('linear', 'reference')}`, K/V fill `{st.get('fill', 'prefill')}`, "
            f"median of {st.get('rounds', 8)} interleaved rounds.")
    return [_src(d, "paged_vs_dense.py", name), "", note, "", *rows]


def table_floor(d, name="floor"):
    bw = d["bandwidth"]
    sides = [("", "step")]
    sides += [("_mx_linear", "step, MLX matmul")] if any(
        "step_mx_linear_s" in r for r in d["rows"]) else []
    sides += [("_zero_linear", "step, zero-cost linears")] if any(
        "step_zero_linear_s" in r for r in d["rows"]) else []
    has_min = any("step_min_s" in r for r in d["rows"])
    unit = "ms (median / min)" if has_min else "ms"
    rows = [f"Measured bandwidth: MLX {bw['mlx_gib_s']:.1f} GiB/s, numpy {bw['numpy_gib_s']:.1f}"
            f" GiB/s (the floor uses the faster); weights {d['weight_bytes'] / 2**20:.0f} MiB; KV "
            f"{d['kv_bytes_per_token']} B/token; linear layers "
            f"`{d['settings'].get('linear', 'reference')}`.", "",
            "| batch | context | floor ms |" + "".join(f" {label} {unit} |" for _, label in sides)
            + " step / floor |", "|---:|---:|---:|" + "---:|" * (len(sides) + 1)]
    for r in d["rows"]:
        cells = []
        for key, _ in sides:
            med = r[f"step{key}_s"] * 1e3
            least = r.get(f"step{key}_min_s")
            cells.append(f"{med:.1f} / {least * 1e3:.1f}" if least is not None else f"{med:.1f}")
        ratio = f"{r['step_s'] / r['floor_s']:.2f}x"
        if "step_min_s" in r:
            ratio += f" / {r['step_min_s'] / r['floor_s']:.2f}x"
        rows.append(f"| {r['batch']} | {r['context']} | {r['floor_s'] * 1e3:.2f} | "
                    + " | ".join(cells) + f" | {ratio} |")
    return [_src(d, "floor.py", name), "", *rows]


def table_kernels(d):
    bw = d["bandwidth"].get("floor_gib_s", d["bandwidth"]["mlx_gib_s"])
    st = d["settings"]
    rows = [f"Floor bandwidth {bw:.1f} GiB/s (the faster of the MLX and numpy copy tests); "
            f"one layer, {st['kv_heads']} KV heads x GQA {st['gqa']}, head_dim {st['head_dim']}, "
            f"block size {st['block_size']}, float32 queries.", "",
            "| batch | context | op | ms | KV floor ms | floor / ms |",
            "|---:|---:|---|---:|---:|---:|"]
    rows += [f"| {r['batch']} | {r['context']} | `{r['op']}` | {r['ms']:.2f} | "
             f"{r['floor_ms']:.2f} | {100 * r['floor_ms'] / r['ms']:.1f}% |"
             for r in d["rows"] if "context" in r]
    enc = [r for r in d["rows"] if "tokens" in r]
    if enc:
        rows += ["", "| tokens | op | ms |", "|---:|---|---:|"]
        rows += [f"| {r['tokens']} | `{r['op']}` | {r['ms']:.2f} |" for r in enc]
    return [_src(d, "bench_kernels.py", "kernels"), "", *rows]


def table_linear(d):
    bw = d["bandwidth"]["floor_gib_s"]
    rows = [f"Copy bandwidth {bw:.1f} GiB/s; min (median) ms per call over "
            f"{d['settings']['rounds']} interleaved rounds, each call streaming its own W.", "",
            "| shape | N x K | M | primitive ms | MLX matmul ms | MLX / primitive | W floor ms |",
            "|---|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['primitive']['min_ms']:.3f} "
             f"({r['primitive']['median_ms']:.3f}) | {r['mlx']['min_ms']:.3f} "
             f"({r['mlx']['median_ms']:.3f}) | {r['speedup']:.2f}x | {r['w_floor_ms']:.3f} |"
             for r in d["rows"]]
    return [_src(d, "bench_linear.py", "linear"), "", *rows]


def _projection_codecs(d: dict) -> list[str]:
    """int8, the cheapest codec within 1% and 2% dPPL, the auto points (with their
    long-context variants, `ctx=`)."""
    picks = ["int8"] + [t["codec"] for t in d["iso_dppl"] if t["dppl_target_pct"] >= 1.0]
    picks += [c for c in d["projection"] if c.startswith("auto:") and "family" not in c]
    return list(dict.fromkeys(c for c in picks if c and c in d["projection"]))


def table_speculative(d):
    def method(r):
        if r.get("method", "ngram") == "ngram":
            return "n-gram"
        return f"draft ({r['draft_layers']} layers)" if r.get("draft_layers") else "draft"

    rows = ["| method | task | concurrent | plain tok/s | speculative tok/s | ratio | acceptance | "
            "same tokens |", "|---|---|---:|---:|---:|---:|---:|---|"]
    rows += [f"| {method(r)} | {r['task']} | {r['concurrency']} | {r['plain_tok_s']:.1f} | "
             f"{r['speculative_tok_s']:.1f} | {r['ratio']:.2f} | {r['acceptance']:.2f} | "
             f"{'yes' if r['identical_tokens'] else 'NO'} |"
             for r in sorted(d["rows"], key=lambda r: method(r) != "n-gram")]
    out = [_src(d, "bench_speculative.py", "speculative"), "", *rows]
    if "row_cost" in d:
        out += ["", *_row_cost_lines(d["row_cost"])]
    return out


def _row_cost_lines(cost: dict) -> list[str]:
    """The step-time curve behind the sizing (older files: 8 sequences only, no fit)."""
    by_seqs: dict[int, list[str]] = {}
    for c in cost["curve"]:
        by_seqs.setdefault(c.get("num_seqs", 8), []).append(
            f"{c['rows']} rows {c['step_ms']:.0f} ms")
    out = [f"Step time of {n} sequence{'s' if n > 1 else ''} by query rows: {', '.join(pts)}."
           for n, pts in by_seqs.items()]
    if "step_cost" in cost:
        knots = ", ".join(f"{r}: {t:.2f}" for r, t in cost["step_cost"])
        out.append(f"As a step_cost curve (rows: time relative to one row): {knots}.")
    return out


def table_chat(d, name="chat"):
    rows = ["| server | concurrent | turns | completion tok/s | TTFT p50 / p90 s | prompt tokens "
            "(cached) | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for server, runs in d["results"].items():
        rows += [f"| {server} | {r['concurrency']} | {r['turns']} | {r['completion_tok_s']:.1f} | "
                 f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | {r['prompt_tokens']} "
                 f"({r['cached_tokens']}) | {r['errors']} |" for r in runs]
    rows += ["", "| concurrent | completion tok/s, mlxkv / mlx_lm.server | TTFT p90 ratio |",
             "|---:|---:|---:|"]
    rows += [f"| {r['concurrency']} | {r['completion_tok_s_ratio']:.2f}x | "
             f"{r['ttft_p90_ratio']:.2f}x |" for r in d["ratios"]]
    return [_src(d, "bench_chat.py", name), "", *rows]


def _named(doc: str, name: str, table):
    """A tables entry whose renderer also names its result file (source line)."""
    return doc, name, lambda d: table(d, name)


def render(results: Path) -> None:
    tables = {
        "throughput": ("benchmarks.md", "throughput", table_throughput),
        "server": ("benchmarks.md", "server", table_server),
        "chat": ("benchmarks.md", "chat", table_chat),
        "shared_prefix": ("benchmarks.md", "shared_prefix", table_shared),
        "paged_vs_dense": ("benchmarks.md", "paged_vs_dense", table_pvd),
        "floor": ("benchmarks.md", "floor", table_floor),
        "kernels": ("kernels.md", "kernels", table_kernels),
        "linear": ("kernels.md", "linear", table_linear),
        "linear_floor": ("kernels.md", "floor", table_floor),
        "linear_pvd": ("kernels.md", "paged_vs_dense", table_pvd),
        "pvd_repeat": _named("benchmarks.md", "paged_vs_dense_repeat", table_pvd),
        "pvd_codecs": _named("benchmarks.md", "paged_vs_dense_codecs", table_pvd),
        "linear_throughput": ("kernels.md", "throughput", table_throughput),
        "chat16": _named("benchmarks.md", "chat16", table_chat),
        "step_profile": ("benchmarks.md", "step_profile", table_step_profile),
        "speculative": ("speculative.md", "speculative", table_speculative),
        "quality_smollm2": _named("compression.md", "quality_smollm2-135m-instruct",
                                  table_quality),
        "quality_gemma3": _named("compression.md", "quality_gemma3-270m", table_quality),
    }
    both = {"SmolLM2-135M": _load("quality_smollm2-135m-instruct", results),
            "Gemma-3-270M": _load("quality_gemma3-270m", results)}
    both = {k: v for k, v in both.items() if v is not None and "by_ctx" in v}
    tables["quality_iso"] = ("compression.md", None, lambda _: table_iso(both))
    tables["quality_pairs"] = ("compression.md", None, lambda _: table_pairs(both))
    tables["quality_iso_1k_4k"] = ("compression.md", None,
                                   lambda _: table_iso(both, ("1024",)))
    tables["quality_projection"] = ("compression.md", None, lambda _: table_projection(
        both, {m: _projection_codecs(d) for m, d in both.items()}))
    tables["capacity"] = ("compression.md", "capacity", table_capacity)
    tables["fit_steps"] = ("compression.md", "fit_steps", table_fit_steps)
    for marker, (doc, name, fn) in tables.items():
        data = _load(name, results) if name else both
        path = DOCS / doc
        text = path.read_text()
        pattern = re.compile(rf"(<!-- BEGIN {marker} -->\n).*?(<!-- END {marker} -->)", re.S)
        if data is None or not pattern.search(text):
            continue
        body = "\n".join(fn(data)) + "\n"
        path.write_text(pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text))
        print(f"rendered {marker} into docs/{doc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", action="store_true", help="only re-render the docs")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    results = HERE / "results" / ("quick" if args.quick else "")
    if not args.render:
        for run in RUNS:
            cmd = [sys.executable, str(HERE / run[0]), *run[1:]]
            if args.quick:
                cmd = [sys.executable, str(HERE / run[0]), "--quick", "--out", str(results)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, cwd=HERE)
    if not args.quick:
        render(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
