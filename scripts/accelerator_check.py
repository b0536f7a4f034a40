"""One command for the day a Metal or CUDA device appears (run via scripts/accelerator_check.sh).

Runs, on whatever backend `selfcheck.detect_backend` picks (Metal, CUDA, else the CPU
extension): (1) the kernel grid: the start-up self-check (every kernel vs its pure-mx twin,
split and unsplit paths, the lattice encode) over dtypes x head dims x GQA x codecs x block
sizes x windows; (2) engine parity on SmolLM2: greedy text and per-step logits with the
kernels vs MLXKV_ATTENTION=reference; (3) decode attention time as a fraction of the memory
bandwidth floor (goal >= 70%); (4) benchmarks/bench_kernels.py and paged_vs_dense.py
(--quick) into --out. Prints one table; exit status 1 when a check fails.
docs/kernels.md ("Accelerator check") says how to read it.
"""

# ruff: noqa: E402, I001  (benchmarks/_common preloads OpenBLAS before mlx)
from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from floor import bandwidth_gib_s  # BLAS first

import mlx.core as mx
import numpy as np

from mlxkv.codec import parse_kv_codec
from mlxkv.kernels.selfcheck import KernelGuard, detect_backend
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.kv_store import KVStore

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
CODECS = ("identity", "int8", "int4", "e8:k4v3", "d4:k4v3")
Row = tuple[str, str, str]


def _store(codec: str, kvh: int, D: int, bs: int, dtype, window, num_blocks=8) -> KVStore:
    codecs = None if codec == "identity" else parse_kv_codec(codec, 1)
    return KVStore([KVGroupSpec((0,), kvh, D, window)], [num_blocks], bs, dtype, codecs)


def kernel_grid(backend, quick: bool) -> Row:
    """Self-check of every kernel variant over the grid; one row."""
    heads = (64, 128) if quick else (64, 128, 256)
    grid = list(itertools.product(DTYPES, heads, (1, 4, 8), CODECS))
    failures, states, slowest = [], {}, 0.0
    for n, (dt, D, gqa, codec) in enumerate(grid):
        bs, window = (16, None) if n % 2 == 0 else (32, 20)
        guard = KernelGuard(backend)
        guard.run_selfcheck(_store(codec, 2, D, bs, DTYPES[dt], window), 2 * gqa)
        slowest = max(slowest, guard.selfcheck_ms or 0.0)
        for key, status in guard.kernels.items():
            states[status.state] = states.get(status.state, 0) + 1
            if status.state == "disabled":
                failures.append(f"{dt} D{D} G{gqa} {codec} BS{bs} W{window}: {key}: "
                                f"{status.reason}")
    detail = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
    detail += f"; {len(grid)} configs; slowest self-check {slowest:.0f} ms"
    for line in failures[:10]:
        print("  FAIL", line)
    return ("kernel grid vs twins", "FAIL" if failures else "ok", detail)


def engine_parity(model: str, tokens: int) -> Row:
    """SmolLM2 greedy text and logits: kernels ('auto') vs the reference path."""
    from mlxkv.config import CacheConfig, EngineConfig
    from mlxkv.llm import LLM
    from mlxkv.models.loader import load_model
    from mlxkv.sampling import SamplingParams

    loaded = load_model(model, progress=False)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    runs = []
    for attention in ("auto", "reference"):
        llm = LLM(EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256),
                               attention=attention), loaded=loaded)
        rows: list[np.ndarray] = []
        llm.engine.logits_sink = lambda _ids, lg, rows=rows: rows.append(
            np.array(lg.astype(mx.float32)))
        texts = [o["text"] for o in llm.generate(prompts, params)]
        runs.append((texts, rows, llm.engine.cache_stats()["attention"]))
    (texts, rows, report), (ref_texts, ref_rows, _) = runs
    diff = max(float(np.abs(a - b).max()) for a, b in zip(rows, ref_rows, strict=True))
    disabled = [k for k, s in report["kernels"].items() if s["state"] == "disabled"]
    ok = texts == ref_texts and diff < 5e-2 and not disabled
    detail = (f"backend {report['backend']}; text {'identical' if texts == ref_texts else 'DIFFERS'}"
              f"; max |logit diff| {diff:.2e}; disabled {disabled or 'none'}")
    return ("engine parity (SmolLM2)", "ok" if ok else "FAIL", detail)


def _time_ms(fn, repeats: int = 20) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def decode_floor(backend, bw_gib_s: float, quick: bool) -> list[Row]:
    """Decode attention (kvh 8 x GQA 4, D 128, fp16 pool) vs the bytes-read floor."""
    rows = []
    if backend.decode_op is None:
        return [("decode vs bandwidth floor", "skip", "no decode kernel on this backend")]
    for batch, context in ((1, 2048), (8, 2048)) if quick else ((1, 4096), (8, 4096), (8, 16384)):
        kvh, D, bs = 8, 128, 16
        per_seq = context // bs
        store = _store("identity", kvh, D, bs, mx.float16, None, batch * per_seq + 1)
        slots = mx.arange(bs, (batch * per_seq + 1) * bs)
        x = mx.random.normal((slots.size, kvh, D)).astype(mx.float16)
        store.write(0, slots, x, x)
        mx.eval(store.arrays())
        tables = mx.arange(1, batch * per_seq + 1, dtype=mx.int32).reshape(batch, per_seq)
        lens = mx.full((batch,), context, dtype=mx.int32)
        q = mx.random.normal((batch, kvh * 4, D)).astype(mx.float16)
        ms = _time_ms(partial(backend.decode_op, q, store, 0, tables, lens, D**-0.5, None))
        floor_ms = 2 * batch * context * kvh * D * 2 / (bw_gib_s * 2**30) * 1e3
        share = floor_ms / ms
        rows.append((f"decode B{batch} x {context} vs floor", "ok" if share >= 0.7 else "below",
                     f"{ms:.3f} ms, floor {floor_ms:.3f} ms = {100 * share:.0f}% (goal >= 70%)"))
    return rows


def bench(script: str, out: Path) -> Row:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1][:100]
    log = out / f"{Path(script).stem}.log"
    log.write_text(proc.stdout + proc.stderr)
    return (script, "ok" if proc.returncode == 0 else "FAIL", f"{tail} (log: {log})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accelerator"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true", help="smaller grid and sizes")
    p.add_argument("--skip-benchmarks", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = detect_backend("auto")
    bw = bandwidth_gib_s(256)["floor_gib_s"]
    print(f"backend {backend.name} (accelerator: {backend.is_accelerator}); device "
          f"{mx.default_device()}; copy bandwidth {bw:.1f} GiB/s; mlx {mx.__version__}")
    rows = [kernel_grid(backend, args.quick), engine_parity(args.model, 16)]
    rows += decode_floor(backend, bw, args.quick)
    if not args.skip_benchmarks:
        rows += [bench("bench_kernels.py", out), bench("paged_vs_dense.py", out)]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  result  detail")
    for name, result, detail in rows:
        print(f"{name:<{width}}  {result:<6}  {detail}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
