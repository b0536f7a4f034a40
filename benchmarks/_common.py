"""Shared benchmark plumbing: header (hardware, versions, git revision), JSON, plots, models."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import mlxkv  # noqa: F401  (OpenBLAS before mlx)

RESULTS = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    root = Path(__file__).parents[1]
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                      text=True, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".",  # results do not
                                ":(exclude)benchmarks/results"], cwd=root).returncode != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(model: str, dtype: str, settings: dict) -> dict:
    """Everything a reader needs to reproduce or compare a result."""
    import mlx.core as mx
    import mlx_lm

    from mlxkv._blas import openblas_path

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "hardware": {"cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": round(mem, 1),
                     "os": platform.platform(), "mlx_device": str(mx.default_device()),
                     "blas": openblas_path() or "bundled reference BLAS"},
        "versions": {"python": platform.python_version(), "mlx": mx.__version__,
                     "mlx_lm": mlx_lm.__version__, "mlxkv": mlxkv.__version__},
        "model": model, "dtype": dtype, "settings": settings,
    }


def print_header(h: dict) -> None:
    hw = h["hardware"]
    print(f"# {hw['cpu']} ({hw['cores']} cores, {hw['ram_gib']} GiB), {hw['mlx_device']}, "
          f"BLAS: {hw['blas']}")
    print(f"# mlx {h['versions']['mlx']}, mlx-lm {h['versions']['mlx_lm']}, "
          f"git {h['git_revision']}, model {h['model']} ({h['dtype']})")
    print(f"# settings: {json.dumps(h['settings'])}")


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"# wrote {path}")
    return path


def load_model_for(args):
    """(loaded, name): the real model, or a random tiny llama in --quick mode."""
    if args.quick and not args.model:
        from mlxkv.models.tiny import make_tiny_model

        return (make_tiny_model("llama", vocab_size=512), None), "tiny-llama (random)"
    from mlxkv.models.loader import load_model

    loaded = load_model(args.model, progress=True)
    return loaded, loaded.name


def plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict,
         log: bool = False) -> Path | None:
    """Line plot of {label: (xs, ys)} to path (PNG), log-log when `log`; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# wrote {path}")
    return path


def bar_plot(path: Path, title: str, panels: dict) -> Path | None:
    """Side-by-side bars: {panel title: {bar label: value}}, one subplot per panel (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (panel, bars) in zip(axes[0], panels.items(), strict=True):
        labels, values = list(bars), list(bars.values())
        ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
        for i, v in enumerate(values):
            text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
            ax.annotate(text, (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# wrote {path}")
    return path


def linear_variants(llm) -> dict:
    """Ways to run an LLM's linear layers, as {suffix: apply()}: "" as configured and, when
    the engine routes them through the compiled small-M linear (MLXKV_LINEAR=auto on the
    CPU), "_mx_linear" with MLX's matmul (the runner's module tree set to the plain model,
    which is what MLXKV_LINEAR=reference runs)."""
    runner = llm.engine.runner
    routed, plain = runner.net, runner.model

    def use(net):
        return lambda: setattr(runner, "net", net)

    return {"": use(routed), "_mx_linear": use(plain)} if routed is not plain else {
        "": use(routed)}


def engine_step_times(engine, variants: dict, rounds: int, steps: int = 2) -> dict:
    """Seconds per `engine.step()` for each variant ({name: apply()}), in interleaved
    blocks. The engine pipelines (step N + 1 is launched before N's results are read), so
    a step's time is mostly the evaluation of the step launched before it; per round and
    variant: drain MLX's queue (untimed), apply the variant, one untimed step (it launches
    the variant's first step), then `steps` timed steps, each paying for one of its own."""
    import mlx.core as mx

    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, apply in variants.items():
            mx.synchronize()
            apply()
            engine.step()
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - start)
    next(iter(variants.values()))()  # back to the first (the configured) variant
    return times
