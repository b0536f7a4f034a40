"""Bounded soak: constant concurrent load on mlxkv serve; errors, p99 latency and memory over time.

The server runs in-process (uvicorn thread + AsyncEngine) so its RSS and MLX active/peak
memory can be sampled every second. Flat memory and zero errors are the pass criteria;
at the end the cache must hold no blocks in use.

    python benchmarks/soak.py --duration 300 --concurrency 32
    python benchmarks/soak.py --quick
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from _common import RESULTS, header, print_header, write_json
from _loadgen import run_load, summarize

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "server"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    duration = args.duration or (10 if args.quick else 300)
    conc = args.concurrency or (4 if args.quick else 32)
    import mlx.core as mx
    from bench_server import PROMPTS
    from live_server import live_server

    from mlxkv.async_engine import AsyncEngine
    from mlxkv.config import EngineConfig, ModelConfig, SchedulerConfig
    from server.app import create_app

    config = EngineConfig(model=ModelConfig(model=args.model),
                          scheduler=SchedulerConfig(max_num_seqs=conc))
    engine = AsyncEngine.from_config(config)
    h = header(args.model, "float32", {"duration_s": duration, "concurrency": conc,
                                       "max_tokens": args.max_tokens})
    print_header(h)
    timeline, stop = [], threading.Event()

    def sampler() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            timeline.append({"t": time.perf_counter() - t0, "rss_mib": rss_mib(),
                             "mx_active_mib": mx.get_active_memory() / 2**20,
                             "mx_peak_mib": mx.get_peak_memory() / 2**20,
                             "blocks_used": engine.cache_stats().get("blocks_used", 0)})
            time.sleep(1.0)

    with live_server(create_app(engine)) as url:
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        samples, wall = run_load(url, engine.model_name, PROMPTS, conc, 0, args.max_tokens,
                                 stop_at=time.perf_counter() + duration)
        stop.set()
        thread.join()
        time.sleep(1.0)
        final = engine.cache_stats()
    engine.shutdown()
    summary = summarize(samples, wall)
    summary["blocks_used_at_end"] = final["blocks_used"]
    print(f"requests {summary['requests']}, errors {summary['errors']}, "
          f"{summary['tok_s']:.1f} tok/s, p99 latency {summary['latency_p99']:.2f} s, "
          f"RSS {timeline[0]['rss_mib']:.0f} -> {timeline[-1]['rss_mib']:.0f} MiB, "
          f"blocks in use at end {final['blocks_used']}")
    out = {**h, "summary": summary, "timeline": timeline}
    tag = "soak_quick" if args.quick else "soak"
    write_json(tag, out, args.out)
    _plot(Path(args.out) / f"{tag}.png", timeline, args.model)
    return out


def _plot(path: Path, timeline: list[dict], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = [x["t"] for x in timeline]
    for key in ("rss_mib", "mx_active_mib", "mx_peak_mib"):
        ax.plot(t, [x[key] for x in timeline], label=key)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"Soak memory, {model}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
