#!/usr/bin/env bash
# Build mlxkv._ext (the compiled CPU kernels) against the installed mlx wheel and copy it
# into mlxkv/. Optional: without it mlxkv runs its pure-mx reference attention on the CPU.
# Needs cmake >= 3.24, a C++17 compiler and nanobind (pip-installed here when missing); its
# internals ABI must match the one mlx.core was built with, which the final check verifies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/ext}
"$PY" -c "import nanobind" 2>/dev/null || "$PY" -m pip install -q "nanobind>=2.9"
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S csrc -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build "$BUILD" -j
cp "$BUILD"/_ext*.so mlxkv/
"$PY" -c "import mlxkv.kernels.paged_attention_cpu as m, sys; sys.exit(not m.is_cpu_kernel_available())"
echo "built $(ls mlxkv/_ext*.so)"
