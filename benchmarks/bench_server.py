"""Server load: mlxkv serve vs mlx_lm.server on the same model, openai client over loopback.

Both servers run as subprocesses on the same converted model folder (float32; OpenBLAS
preloaded for both). For each concurrency, every worker sends streaming chat requests
back to back; reported: aggregate tok/s, TTFT and inter-token latency p50/p99, errors.

    python benchmarks/bench_server.py                    # SmolLM2, concurrency 1 4 8 16 32
    python benchmarks/bench_server.py --quick            # concurrency 1 2, short outputs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _common import RESULTS, header, plot, print_header, write_json
from _loadgen import run_load, summarize
from tqdm import tqdm

from mlxkv._blas import OPENBLAS_CANDIDATES

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "List some facts about the Moon.", "Describe a busy market in the morning.",
           "What makes a good friend?", "Tell me about the history of bread."]


def start(cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited: {proc.stderr.read().decode()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def served_name(port: int, default: str) -> str:
    """The id the server lists, else `default` (mlx_lm.server accepts its --model path)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError):
        return default


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--requests-per-worker", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    conc = args.concurrency or ([1, 2] if args.quick else [1, 4, 8, 16, 32])
    per_worker = args.requests_per_worker or (1 if args.quick else 2)
    max_tokens = args.max_tokens or (8 if args.quick else 48)
    from mlxkv.models.loader import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    blas = next((b for b in OPENBLAS_CANDIDATES if os.path.exists(b)), None)
    env = {**os.environ, **({"LD_PRELOAD": blas} if blas else {})}
    servers = {
        "mlxkv": ([sys.executable, "-m", "server", "--model", model_dir, "--port", "8411",
                   "--max-num-seqs", str(max(conc))], 8411),
        "mlx_lm.server": ([sys.executable, "-m", "mlx_lm.server", "--model", model_dir,
                           "--port", "8412"], 8412),
    }
    settings = {"concurrency": conc, "requests_per_worker": per_worker,
                "max_tokens": max_tokens, "sampling": "greedy", "prompts": len(PROMPTS),
                "servers": {k: " ".join(v[0][1:]) for k, v in servers.items()}}
    h = header(args.model, "float32", settings)
    print_header(h)
    results: dict[str, list] = {}
    for label, (cmd, port) in servers.items():
        proc = start(cmd, port, {**env, "PYTHONPATH": str(Path(__file__).parents[1])})
        try:
            name = served_name(port, model_dir)
            run_load(f"http://127.0.0.1:{port}", name, PROMPTS, 1, 1, 4)  # warm-up
            rows = []
            for c in tqdm(conc, desc=label):
                samples, wall = run_load(f"http://127.0.0.1:{port}", name, PROMPTS, c,
                                         per_worker, max_tokens)
                rows.append({"concurrency": c, **summarize(samples, wall)})
                r = rows[-1]
                tqdm.write(f"{label:>14} c={c:<3} {r['tok_s']:7.1f} tok/s  TTFT p50 "
                           f"{r['ttft_p50'] * 1e3:7.0f} ms p99 {r['ttft_p99'] * 1e3:7.0f} ms  "
                           f"ITL p50 {r['itl_p50'] * 1e3:6.1f} ms p99 {r['itl_p99'] * 1e3:6.1f} "
                           f"ms  errors {r['errors']}")
            results[label] = rows
        finally:
            proc.terminate()
            proc.wait(30)
    out = {**h, "results": results}
    tag = "server_quick" if args.quick else "server"
    write_json(tag, out, args.out)
    plot(Path(args.out) / f"{tag}.png", f"Server throughput, {args.model}",
         "concurrent clients", "tokens/s",
         {k: (conc, [r["tok_s"] for r in v]) for k, v in results.items()})
    return out


if __name__ == "__main__":
    main()
