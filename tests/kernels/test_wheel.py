"""The wheel ships the Metal bodies (metal/ -> mlxkv/_metal) and the kernels load them there."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_loads_the_metal_bodies(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("mlxkv-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    bodies = sorted(p.name for p in (ROOT / "metal").iterdir())
    assert bodies and all(f"mlxkv/_metal/{name}" in names for name in bodies)
    probe = ("import mlxkv.kernels._source as s; print(s._metal_dir()); "
             "print(len(s.load_source('paged_attention_quant.metal')))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    metal_dir, size = out.stdout.split()
    assert Path(metal_dir) == site / "mlxkv" / "_metal"
    assert int(size) == len((ROOT / "metal" / "paged_attention_quant.metal").read_text())
