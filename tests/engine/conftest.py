"""Engine test fixtures: the real models loaded once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from mlxkv.models.loader import load_model

    return load_model(str(smollm2_dir), progress=False)


@pytest.fixture(scope="session")
def gemma3(gemma3_dir):
    from mlxkv.models.loader import load_model

    return load_model(str(gemma3_dir), progress=False)
