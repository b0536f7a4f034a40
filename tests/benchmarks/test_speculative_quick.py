"""benchmarks/bench_speculative.py --quick runs on a tiny model and writes the issue's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_speculative_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--quick", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks",
        env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's mlxkv, not an install
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "speculative_quick.json").read_text())
    assert {"git_revision", "hardware", "model", "settings", "rows", "row_cost"} <= set(data)
    assert [(r["task"], r["concurrency"]) for r in data["rows"]] == [
        ("grounded", 1), ("grounded", 2), ("free", 1), ("free", 2)]
    assert all(r["ratio"] > 0 and r["identical_tokens"] for r in data["rows"])
    assert (tmp_path / "speculative_quick.png").is_file()
