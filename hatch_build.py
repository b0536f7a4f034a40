"""Hatchling build hook: compile mlxkv._ext (csrc/, the CPU attention primitive) with CMake.

Runs for `pip install -e .` (the .so is copied next to the sources, where the editable
install imports it) and for wheels (the .so is force-included as mlxkv/_ext*.so and the
wheel is tagged for this platform). The extension is optional: when cmake, a C++ compiler,
mlx or nanobind is missing, or the build fails, the hook prints one warning line and the
package installs without it (mlxkv then runs its reference attention). MLXKV_SKIP_EXT=1
skips the build; MLXKV_EXT_BUILD_DIR sets the CMake build folder (default build/ext).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _cmake_build(root: Path, build_dir: Path) -> Path:
    """Configure + build csrc/ into build_dir; return the built .so. Raises on failure."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake not found")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(root / "csrc"), "-B", str(build_dir), *gen,
                    "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j"], check=True, capture_output=True,
                   text=True)
    built = sorted(build_dir.glob("_ext*.so"))
    if not built:
        raise RuntimeError(f"no _ext*.so under {build_dir}")
    return built[0]


def _reason(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        lines = [ln.strip() for ln in (exc.stderr or exc.stdout or "").splitlines()]
        errors = [ln for ln in lines if "error" in ln.lower() or "could not" in ln.lower()]
        return f"{Path(exc.cmd[0]).name} failed: {(errors or lines or ['?'])[0]}"
    return f"{type(exc).__name__}: {exc}"


class ExtBuildHook(BuildHookInterface):
    """Builds the optional C++ extension; never fails the install."""

    PLUGIN_NAME = "mlxkv-ext"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or os.environ.get("MLXKV_SKIP_EXT") == "1":
            return
        root = Path(self.root)
        build_dir = Path(os.environ.get("MLXKV_EXT_BUILD_DIR", root / "build" / "ext"))
        try:
            so = _cmake_build(root, build_dir)
        except Exception as exc:  # noqa: BLE001  (optional extension: warn, install without)
            print(f"warning: mlxkv._ext not built ({_reason(exc)}); mlxkv will use its "
                  "reference attention on the CPU", file=sys.stderr)
            return
        if version == "editable":
            shutil.copy2(so, root / "mlxkv" / so.name)
            return
        build_data["force_include"][str(so)] = f"mlxkv/{so.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
