"""Kernel tests: the Metal bodies run through the C++ MSL emulator (tests/kernels/harness.py)."""

from __future__ import annotations

import shutil
import sys
from functools import partial
from pathlib import Path

import pytest

import mlxkv  # noqa: F401  (OpenBLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))

if shutil.which("g++") is None:  # pragma: no cover - CI images have g++
    pytest.skip("g++ is needed to emulate the Metal kernels", allow_module_level=True)

from harness import emulate  # noqa: E402  (needs the sys.path entry above)

# Fiber-scheduling seeds of the emulator: each seed is another interleaving of the threads
# between sync points, so a missing barrier or a read of another thread's unsynchronised
# write can pass under one seed and fail under another.
SCHEDULE_SEEDS = (0, 1, 2)


@pytest.fixture(params=SCHEDULE_SEEDS, ids=lambda seed: f"sched{seed}")
def emulator(request):
    """`emulate` under each scheduling seed (an executor for the `*_kernel` functions)."""
    return partial(emulate, seed=request.param)


@pytest.fixture
def metal_via_emulator(monkeypatch):
    """`route(module, kernel_fn)`: the module's dispatcher sees a Metal device, and its
    `kernel_fn` runs its launches on the emulator. Returns the list of kernel names run."""

    def route(module, kernel_fn: str) -> list[str]:
        launches: list[str] = []

        def executor(launch):
            launches.append(launch.spec.name)
            return emulate(launch)

        monkeypatch.setattr(module, "is_metal_available", lambda: True)
        monkeypatch.setattr(module, kernel_fn,
                            partial(getattr(module, kernel_fn), executor=executor))
        return launches

    return route
