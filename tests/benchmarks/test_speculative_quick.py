"""benchmarks/bench_speculative.py --quick runs on a tiny model and writes the issue's JSON;
a `--method draft` run adds its rows next to the prompt-lookup rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
CELLS = [("grounded", 1), ("grounded", 2), ("free", 1), ("free", 2)]


def _bench(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--quick", "--out",
         str(out), *extra], capture_output=True, text=True, timeout=300,
        cwd=ROOT / "benchmarks",
        env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's mlxkv, not an install
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "speculative_quick.json").read_text())


def test_speculative_quick(tmp_path):
    data = _bench(tmp_path)
    assert {"git_revision", "hardware", "model", "settings", "rows", "row_cost"} <= set(data)
    assert [(r["task"], r["concurrency"]) for r in data["rows"]] == CELLS
    assert all(r["ratio"] > 0 and r["identical_tokens"] for r in data["rows"])
    assert (tmp_path / "speculative_quick.png").is_file()
    data = _bench(tmp_path, "--method", "draft", "--draft-cost", "0", "--no-row-cost")
    rows = data["rows"]
    assert [(r["task"], r["concurrency"], r["method"]) for r in rows] == [
        (t, c, m) for m in ("ngram", "draft") for t, c in CELLS]
    assert all(r["identical_tokens"] for r in rows) and "row_cost" in data
    assert all(r["draft_layers"] == 2 and r["draft_cost"] == r["draft_relative_cost"] == 0
               for r in rows if r["method"] == "draft")
    assert set(data["runs"]) == {"ngram/None/None", "draft/2/0.0"}
