#!/usr/bin/env bash
# One command for the day a Metal or CUDA device appears: the kernel grid against the pure-mx
# twins, engine parity on SmolLM2, decode vs the bandwidth floor, bench_kernels.py and
# paged_vs_dense.py, printed as one table (docs/kernels.md, "Accelerator check").
#   bash scripts/accelerator_check.sh [--quick] [--out DIR] [--skip-benchmarks]
# Exit status 1 when a check fails. Without an accelerator it checks the CPU extension.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/accelerator_check.py "$@"
