"""Each benchmark runs in --quick mode on a tiny model and writes JSON of the expected shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300, cwd=ROOT / "benchmarks")


def test_throughput_quick(tmp_path):
    proc = run("bench_throughput.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "throughput_quick.json").read_text())
    assert {"git_revision", "hardware", "model", "settings", "rows"} <= set(data)
    assert [r["concurrency"] for r in data["rows"]] == [1, 4]
    assert all({"mlxkv_tok_s", "mlx_lm_tok_s", "ratio"} <= set(r) for r in data["rows"])


def test_quality_quick(tmp_path):
    proc = run("quality.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(next(tmp_path.glob("quality_*.json")).read_text())
    assert [r["codec"] for r in data["rows"]] == ["auto", "int8", "e8:k4v3"]
    assert all({"bytes_per_token", "ppl", "dppl_pct", "kl"} <= set(r) for r in data["rows"])
    assert [t["dppl_target_pct"] for t in data["iso_dppl"]] == [0.5, 1.0, 2.0]


def test_detok_cost_quick(tmp_path):
    proc = run("detok_cost.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "detok_cost.json").read_text())
    assert {"git_revision", "hardware", "rows"} <= set(data)
    row = data["rows"][0]
    assert row["num_tokens"] == 200
    assert {"per_token_us_by_bucket", "slope_us_per_1000_tokens"} <= set(row["new_window"])


@pytest.mark.parametrize("argv", [["bench", "--tiny", "--max-tokens", "4"]])
def test_mlxkv_bench_cli(tmp_path, argv):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mlxkv.cli", *argv, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aggregate tok/s, 8 requests" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["kv_bytes_per_token"]) >= {"fp16", "int8", "e8:k4v3"}


def test_server_quick(tmp_path, smollm2_dir):
    proc = run("bench_server.py", tmp_path, "--model", str(smollm2_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "server_quick.json").read_text())
    assert set(data["results"]) == {"mlxkv", "mlx_lm.server"}
    for rows in data["results"].values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all({"tok_s", "ttft_p50", "itl_p99", "errors"} <= set(r) for r in rows)


def test_soak_quick(tmp_path, smollm2_dir):
    proc = run("soak.py", tmp_path, "--model", str(smollm2_dir), "--duration", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "soak_quick.json").read_text())
    assert {"requests", "errors", "latency_p99", "blocks_used_at_end"} <= set(data["summary"])
    assert data["timeline"] and {"rss_mib", "mx_active_mib"} <= set(data["timeline"][0])


def test_shared_prefix_quick(tmp_path):
    proc = run("shared_prefix.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "shared_prefix_quick.json").read_text())
    for side in ("mlxkv", "mlx_lm"):
        r = data[side]
        assert {"tokens_stored", "kv_bytes_stored", "overhead", "prefill_tokens",
                "ttft_first_s", "ttft_followers_median_s"} <= set(r)
        assert r["kv_bytes_stored"] == r["tokens_stored"] * r["bytes_per_token"]
        assert len(r["cached_tokens"]) == 8
    assert data["mlxkv"]["bytes_per_token"] == data["mlx_lm"]["bytes_per_token"]
    # both sides reuse the prefix: followers compute only their own suffix
    assert data["mlxkv"]["prefill_tokens"] == data["mlx_lm"]["prefill_tokens"] == 64 + 8 * 16
    assert (tmp_path / "shared_prefix_quick.png").stat().st_size > 0


def test_floor_quick(tmp_path):
    proc = run("floor.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "floor_quick.json").read_text())
    assert {"mlx_gib_s", "numpy_gib_s"} <= set(data["bandwidth"])
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    assert all({"step_s", "floor_s", "bytes_per_step"} <= set(r) for r in data["rows"])
    assert (tmp_path / "floor_quick.png").stat().st_size > 0


def test_paged_vs_dense_quick(tmp_path):
    proc = run("paged_vs_dense.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "paged_vs_dense_quick.json").read_text())
    assert [(r["batch"], r["context"]) for r in data["rows"]] == [(1, 16), (1, 32), (8, 16),
                                                                  (8, 32)]
    assert all({"paged_tok_s", "dense_tok_s", "ratio"} <= set(r) for r in data["rows"])


def test_paged_vs_dense_quick_times_both_write_paths(tmp_path):
    proc = run("paged_vs_dense.py", tmp_path, "--batches", "1", "--contexts", "16",
               "--codecs", "e8:k4v4", "--mx-encode", "--no-reference")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "paged_vs_dense_quick.json").read_text())
    (row,) = data["rows"]
    assert set(row["codecs"]) == {"e8:k4v4", "e8:k4v4 mx-encode"}
    assert all(v["vs_fp"] > 0 for v in row["codecs"].values())


def test_kernels_quick(tmp_path):
    proc = run("bench_kernels.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "kernels_quick.json").read_text())
    assert {"git_revision", "hardware", "settings", "bandwidth", "rows"} <= set(data)
    ops = {r["op"] for r in data["rows"]}
    assert {"sdpa_contiguous", "paged_attention_ref", "kv_encode_ref[e8m4]"} <= ops
    attention = [r for r in data["rows"] if "context" in r]
    assert attention and all(r["ms"] > 0 and r["floor_ms"] > 0 for r in attention)
    assert (tmp_path / "kernels_quick.png").stat().st_size > 0


def test_linear_quick(tmp_path):
    proc = run("bench_linear.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "linear_quick.json").read_text())
    assert {"git_revision", "hardware", "settings", "bandwidth", "rows"} <= set(data)
    assert [r["m"] for r in data["rows"]] == [1, 8]
    assert all(r["primitive"]["min_ms"] > 0 and r["mlx"]["min_ms"] > 0 for r in data["rows"])
