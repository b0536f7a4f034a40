"""Kernel tests: the Metal bodies run through the C++ MSL emulator (tests/kernels/harness.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import mlxkv  # noqa: F401  (OpenBLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))

if shutil.which("g++") is None:  # pragma: no cover - CI images have g++
    pytest.skip("g++ is needed to emulate the Metal kernels", allow_module_level=True)
