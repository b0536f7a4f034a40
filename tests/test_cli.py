"""`mlxkv` CLI: generate streams text + a timing line; user errors are one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxkv import cli

ROOT = Path(__file__).parents[1]


def _cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "mlxkv.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def test_generate_default_model_streams_text_and_timing(smollm2_dir):
    proc = _cli("generate", "The capital of France is", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    timing = [ln for ln in proc.stderr.splitlines() if "tok/s" in ln]
    assert len(timing) == 1 and "prompt" in timing[0] and "generation" in timing[0]
    assert "Traceback" not in proc.stderr


def test_generate_chat_uses_template(smollm2_dir, capsys):
    code = cli.main(
        [
            "generate",
            "--chat",
            "Name three fruits.",
            "--system",
            "Be brief.",
            "--max-tokens",
            "12",
            "--model",
            str(smollm2_dir),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip() and "<|im_start|>" not in out.out


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "x", "--model", "/no/such/model"],
        ["generate", "x", "--model", "nobody/nothing"],
        ["generate", "x", "--model", "/no/such/file.gguf"],
        ["generate", "x", "--block-size", "3"],
        ["fetch", "unknown-model"],
    ],
)
def test_bad_input_one_line_exit_2(args):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxkv: error:"), proc.stderr


def test_corrupt_gguf_model_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    proc = _cli("generate", "x", "--model", str(bad), MLXKV_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.gguf" in proc.stderr
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())  # no half-written entry


def test_fetch_prints_cached_folder(smollm2_dir, capsys):
    assert cli.main(["fetch", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_serve_without_server_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "server.serve", None)  # import fails
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server is not available" in err[0]
