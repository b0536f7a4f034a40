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
  "$PY" -m pip install -q -e ".[cpu,dev]"
  # The compiled CPU attention (mlxkv._ext, ~1 min); without it the reference path runs.
  PYTHON="$PY" bash scripts/build_ext.sh >/dev/null \
    || echo "warning: scripts/build_ext.sh failed; CPU attention uses the reference path" >&2
else
  "$PY" -m pip install -q -e ".[dev]"
fi
