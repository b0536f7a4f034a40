"""Shared fixtures. Importing mlxkv first loads OpenBLAS before mlx (Linux CPU speed)."""

from __future__ import annotations

import pytest

import mlxkv  # noqa: F401  (must precede any mlx import)


def _builtin_dir(name: str):
    """The converted model; a failed fetch or conversion fails the test, never skips it."""
    from mlxkv.models.builtin import ensure_builtin

    return ensure_builtin(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Converted SmolLM2-135M-Instruct (fp32 MLX folder in the cache)."""
    return _builtin_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir():
    """Converted Gemma-3-270M base (fp32 MLX folder in the cache)."""
    return _builtin_dir("gemma3-270m")
