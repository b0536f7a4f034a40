"""Host time per engine step, by phase, before vs after the step-loop rework (issue #15).

Each configuration (model, number of sequences, context length) runs in one fresh
process per side: `before` is a git worktree of --before (default 1c1da17, made under
/tmp); this tree alternates --repeats windows with pipelining off (`after-sync`) and on
(`after`). A worker fills the prefix cache with one shared context, admits the sequences
(each a cache hit plus 8 own tokens), waits until all decode, then times windows of
--steps decode steps (the median window is reported). Phases are
exclusive wall times of the functions that do each job (wrapped, so both sides are
measured the same way):

    schedule  Scheduler.schedule                      build   block tables, slots, batch
    graph     ModelRunner.forward + sample (lazy)     update  progress, commits, stops
    detok     Detokenizer.update                      wait    blocked on the device

`host` is the sum of the host phases; `wall` the step's wall time. With pipelining the
host work of step N + 1 runs while step N evaluates, so the host time left on the
critical path is about wall(after) - wait(after-sync) (the device time of a step).

    python benchmarks/step_profile.py                 # tiny 1/16/64 x 256/2048, SmolLM2 1/16 x 2048
    python benchmarks/step_profile.py --quick         # tiny only, 2 configurations
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("schedule", "build", "graph", "update", "detok", "wait")


# -- worker: one side, one configuration -----------------------------------------------
class Timers:
    """Exclusive wall time per phase of wrapped functions (nested calls subtracted)."""

    def __init__(self):
        self.total = dict.fromkeys(PHASES, 0.0)
        self.stack: list[float] = []  # child time accumulated per open call
        self.undo: list = []

    def wrap(self, owner, name: str, phase: str) -> None:
        orig = getattr(owner, name)

        def timed(*args, **kw):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                spent = time.perf_counter() - start
                child = self.stack.pop()
                self.total[phase] += spent - child
                if self.stack:
                    self.stack[-1] += spent

        setattr(owner, name, timed)
        self.undo.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)


class _TimedMx:
    """Stands in for `mx` inside mlxkv.engine so that its eval calls are timed."""

    def __init__(self, mx, timers: Timers):
        self._mx = mx
        for name in ("eval", "async_eval"):
            setattr(self, name, getattr(mx, name))
            timers.wrap(self, name, "wait")

    def __getattr__(self, name):
        return getattr(self._mx, name)


def install_timers(engine_mod) -> Timers:
    import mlx.core as mx

    from mlxkv import cache_manager, detokenizer, runner, scheduler

    t = Timers()
    t.wrap(scheduler.Scheduler, "schedule", "schedule")
    t.wrap(runner.ModelRunner, "forward", "graph")
    t.wrap(engine_mod, "sample", "graph")
    t.wrap(engine_mod, "build_batch", "build")
    t.wrap(runner.ModelRunner, "copy_blocks", "build")
    t.wrap(detokenizer.Detokenizer, "update", "detok")
    t.wrap(cache_manager.KVCacheManager, "commit", "update")
    engine_mod.mx = _TimedMx(mx, t)
    if hasattr(engine_mod.LLMEngine, "_entries"):  # after: output processor, deferred fetch
        from mlxkv import output_processor as op

        t.wrap(engine_mod.LLMEngine, "_entries", "build")
        t.wrap(op.OutputProcessor, "update", "update")
        t.wrap(op.OutputProcessor, "advance", "update")
        t.wrap(op.OutputProcessor, "_fetch", "wait")
    else:  # before: everything inside LLMEngine
        t.wrap(cache_manager.KVCacheManager, "slot_mapping", "build")
        t.wrap(cache_manager.KVCacheManager, "block_tables", "build")
        t.wrap(engine_mod.LLMEngine, "_append", "update")
    return t


def load(model: str):
    from mlxkv.models.builtin import ensure_builtin

    path = str(ensure_builtin("smollm2-135m-instruct", progress=False))
    if model == "smollm2-135m-instruct":
        from mlxkv.models.loader import load_model

        smol = load_model(path, progress=False)
        return smol.model, smol.tokenizer
    from mlx_lm.utils import load_tokenizer

    from mlxkv.models.tiny import make_tiny_model

    # the tiny model's ids (< 512) are real SmolLM2 tokens: detokenizing costs what it would
    return make_tiny_model("llama"), load_tokenizer(Path(path))


def worker(args) -> dict:
    sys.path.insert(0, str(args.repo))
    import mlxkv  # noqa: F401
    import mlxkv.engine as engine_mod
    from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlxkv.llm import LLM
    from mlxkv.sampling import SamplingParams

    assert Path(mlxkv.__file__).resolve().is_relative_to(Path(args.repo).resolve())
    loaded = load(args.model)
    num_steps = args.steps * args.repeats * len(args.modes.split(",")) + 16
    num_blocks = args.context // 16 + args.seqs * (num_steps // 16 + 3) + 16
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=4096,
                                                    max_num_seqs=max(64, args.seqs)))
    engine = LLM(config, loaded=loaded).engine
    modes = args.modes.split(",")
    shared = [(7 * i + 3) % 500 + 1 for i in range(args.context - 8)]
    engine.add_request("warm", shared + [1] * 8, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    params = SamplingParams(max_tokens=num_steps, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(f"s{i}", shared + [(i * 13 + j) % 500 + 1 for j in range(8)],
                           params)
    started: set[str] = set()
    while len(started) < args.seqs:  # prefill (cache hits) until every sequence decodes
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # the modes interleaved, one window of --steps each
        for mode in modes:
            if hasattr(engine, "pipeline"):
                engine.pipeline = mode == "pipelined"
            engine.step()  # the switch settles
            runs[mode].append(time_window(engine, engine_mod, args.steps))
    return {m: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
            for m, rs in runs.items()}


def time_window(engine, engine_mod, num_steps: int) -> dict:
    timers = install_timers(engine_mod)
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    wall = time.perf_counter() - start
    timers.restore()
    ms = {k: v / num_steps * 1e3 for k, v in timers.total.items()}
    ms["host"] = sum(v for k, v in ms.items() if k != "wait")
    ms["wall"] = wall / num_steps * 1e3
    return ms


# -- driver -----------------------------------------------------------------------------
def before_tree(rev: str) -> Path:
    path = Path(f"/tmp/mlxkv-step-profile-{rev}")
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT,
                       check=True, capture_output=True)
        for ext in (ROOT / "mlxkv").glob("_ext*.so"):  # the compiled CPU primitive
            (path / "mlxkv" / ext.name).write_bytes(ext.read_bytes())
    return path


def run_side(repo: Path, modes: str, model: str, seqs: int, context: int, steps: int,
             repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--repo", str(repo),
           "--model", model, "--seqs", str(seqs), "--context", str(context),
           "--steps", str(steps), "--repeats", str(repeats), "--modes", modes]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker failed ({repo}, {model}, {seqs}x{context}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].split('-')[0]}\n{r['seqs']}x{r['context']}" for r in rows]
    sides = ("before", "after-sync", "after")
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.6), 4.5))
    width = 0.27
    for i, side in enumerate(sides):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[side]["host"] for r in rows], width, label=f"{side}: host")
        ax.scatter(xs, [r[side]["wall"] for r in rows], marker="_", s=200, color="k",
                   zorder=3, label="wall per step" if i == 0 else None)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step")
    ax.set_title("Host time per step (bars) and step wall time (ticks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repo", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--modes", default="sync,pipelined", help=argparse.SUPPRESS)
    p.add_argument("--before", default="1c1da17", help="git revision measured as 'before'")
    p.add_argument("--repeats", type=int, default=3, help="interleaved windows per mode")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resume", default=None,
                   help="a log of this script's printed rows: keep them, run the rest")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this tree's mlxkv, then _common
    from _common import header, write_json

    configs = [("tiny", s, c) for s in (1, 16, 64) for c in (256, 2048)]
    configs += [("smollm2-135m-instruct", s, 2048) for s in (1, 16)]
    if args.quick:
        configs, args.repeats, args.steps = [("tiny", 1, 256), ("tiny", 16, 2048)], 1, 4
    before = before_tree(args.before)
    rows = [json.loads(line) for line in Path(args.resume).read_text().splitlines()
            if line.startswith("{")] if args.resume else []
    done = {(r["model"], r["seqs"], r["context"]) for r in rows}
    for model, seqs, context in configs:
        if (model, seqs, context) in done:
            continue
        old = run_side(before, "sync", model, seqs, context, args.steps, args.repeats)
        new = run_side(ROOT, "sync,pipelined", model, seqs, context, args.steps, args.repeats)
        row = {"model": model, "seqs": seqs, "context": context, "before": old["sync"],
               "after-sync": new["sync"], "after": new["pipelined"]}
        row["critical_host_ms"] = round(max(0.0, row["after"]["wall"]
                                            - row["after-sync"]["wait"]), 3)
        row["critical_host_frac"] = round(row["critical_host_ms"] / row["after"]["wall"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: [tuple(c) for c in configs].index((r["model"], r["seqs"],
                                                                r["context"])))
    settings = {"steps": args.steps, "repeats": args.repeats, "block_size": 16,
                "before": args.before, "configs": configs,
                "tiny": "mlxkv.models.tiny llama (3 layers, hidden 64), SmolLM2 tokenizer"}
    result = header("tiny llama + smollm2-135m-instruct", "float32", settings)
    result["rows"] = rows
    out, tag = Path(args.out), "step_profile_quick" if args.quick else "step_profile"
    write_json(tag, result, out)
    plot(rows, out / f"{tag}.png")


if __name__ == "__main__":
    main()
