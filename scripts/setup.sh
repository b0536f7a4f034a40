#!/usr/bin/env bash
# Set up mlxkv for development: system BLAS on Linux, then the package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = "Linux" ]; then
  if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread || echo "warning: could not install libopenblas0-pthread; CPU matmuls will be slow" >&2
  fi
  # Also builds the compiled CPU attention mlxkv._ext (hatch_build.py, ~1 min).
  "$PY" -m pip install -q -e ".[cpu,dev]"
  # The build hook skips the extension with a warning when it cannot build it; retry
  # against the installed mlx (build isolation may have used another one).
  "$PY" -c "import sys, mlxkv.kernels.paged_attention_cpu as m; sys.exit(not m.is_cpu_kernel_available())" 2>/dev/null \
    || PYTHON="$PY" bash scripts/build_ext.sh >/dev/null \
    || echo "warning: mlxkv._ext could not be built; CPU attention uses the reference path" >&2
else
  "$PY" -m pip install -q -e ".[dev]"
fi
