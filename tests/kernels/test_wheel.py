"""The wheel ships the Metal bodies (metal/ -> mlxkv/_metal) and the compiled CPU extension
(hatch_build.py builds csrc/ into mlxkv/_ext*.so), and the kernels load both from there."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_loads_the_metal_bodies_and_the_extension(tmp_path):
    # A build folder of its own (kept between runs: CMake rebuilds only what changed).
    env = {**os.environ, "MLXKV_EXT_BUILD_DIR": str(ROOT / "build" / "ext-wheel")}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("mlxkv-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    bodies = sorted(p.name for p in (ROOT / "metal").iterdir())
    assert bodies and all(f"mlxkv/_metal/{name}" in names for name in bodies)
    assert [n for n in names if n.startswith("mlxkv/_ext") and n.endswith(".so")], \
        f"no extension in {wheel.name} ({proc.stderr[-1000:]})"
    assert not wheel.name.endswith("-none-any.whl")  # a platform wheel
    probe = ("import mlxkv.kernels._source as s; print(s._metal_dir()); "
             "print(len(s.load_source('paged_attention_quant.metal'))); "
             "import mlxkv.kernels.paged_attention_cpu as c, mlxkv._ext as e; "
             "print(c.is_cpu_kernel_available(), e.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    metal_dir, size, ext_ok, ext_file = out.stdout.split()
    assert Path(metal_dir) == site / "mlxkv" / "_metal"
    assert ext_ok == "True" and Path(ext_file).parent == site / "mlxkv"
    assert int(size) == len((ROOT / "metal" / "paged_attention_quant.metal").read_text())


def test_the_build_hook_warns_once_and_goes_on_when_the_extension_cannot_build(
        tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    try:
        import hatch_build
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setenv("MLXKV_EXT_BUILD_DIR", str(tmp_path / "build"))
    hook = type("Hook", (), {"target_name": "wheel", "root": str(tmp_path)})()  # no csrc/
    build_data = {"force_include": {}, "pure_python": True}
    hatch_build.ExtBuildHook.initialize(hook, "standard", build_data)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: mlxkv._ext not built (cmake failed")
    assert build_data == {"force_include": {}, "pure_python": True}
