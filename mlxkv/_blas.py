"""Load an optimised BLAS before MLX on Linux CPU.

The Linux `mlx[cpu]` wheel links the reference netlib BLAS (~6 GFLOP/s fp32). Loading
Debian's OpenBLAS (`libopenblas0-pthread`) with RTLD_GLOBAL *before* the first
`import mlx` makes MLX resolve `cblas_sgemm` to it (~16x faster). After mlx is imported
this has no effect, so `mlxkv/__init__.py` calls it first thing.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)

_state: dict[str, str | None] = {"loaded": None}


def maybe_preload_openblas() -> str | None:
    """Preload OpenBLAS with RTLD_GLOBAL when on Linux and mlx is not imported yet.

    Returns:
        The path of the loaded library, or None when nothing was loaded (not Linux,
        library absent, mlx already imported, or `MLXKV_NO_OPENBLAS=1`).
    """
    if _state["loaded"] is not None:
        return _state["loaded"]
    if not sys.platform.startswith("linux") or os.environ.get("MLXKV_NO_OPENBLAS") == "1":
        return None
    if "mlx.core" in sys.modules:
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _state["loaded"] = path
            return path
    return None


def openblas_path() -> str | None:
    """The OpenBLAS library loaded by `maybe_preload_openblas`, if any."""
    return _state["loaded"]
