"""Mutation tests: every planted data-plane bug must be caught by a logit oracle.

Each mutant (tests/mutation/mutants.py) is planted with monkeypatch; its killing oracle
(tests/oracles.py) must then fail on a *logit or id mismatch* -- a crash or an invariant
error does not count, because the point is that the comparison itself can see wrong KV.
The same oracles pass unmutated in tests/engine/test_equivalence.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants import KILLERS, compressed_scales_from_next_slot  # noqa: E402
from oracles import ORACLES, codec_vs_decode_then_attend  # noqa: E402

from mlxkv.models.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    """The mutants are planted in the pure-mx reference path (attention.py's masks and
    gathers, codec decode). The compiled CPU primitive reads the pools itself and would
    bypass them, so these engines run the reference path; the primitive has its own
    planted-bug tests (tests/kernels/test_cpu_paged_attention.py)."""
    import mlxkv.attention

    # detect_backend (mlxkv/kernels/selfcheck.py) asks attention.default_decode_op
    monkeypatch.setattr(mlxkv.attention, "default_decode_op", lambda *args, **kwargs: None)


def assert_killed(check) -> str:
    with pytest.raises(AssertionError) as info:
        check()
    message = str(info.value)
    assert "differ" in message or "ids" in message, f"killed by something else: {message}"
    print(f"killed: {message}")  # the kill margin (docs/testing.md): pytest -s tests/mutation
    return message


@pytest.mark.parametrize("mutant", list(KILLERS), ids=lambda m: m.__name__)
def test_mutant_is_killed(monkeypatch, mutant):
    arch, oracles = KILLERS[mutant]
    model = make_tiny_model(arch)
    mutant(monkeypatch)
    for name in oracles:
        assert_killed(lambda name=name: ORACLES[name](model))


@pytest.mark.parametrize("spec", ["int8", "e8:k4v3", "lloyd:k4v3"])
def test_compressed_scales_misread_is_killed(monkeypatch, spec):
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    compressed_scales_from_next_slot(monkeypatch)
    assert_killed(lambda: codec_vs_decode_then_attend(model, spec))


@pytest.mark.parametrize("mutant", list(KILLERS), ids=lambda m: m.__name__)
def test_killing_oracle_passes_unmutated(mutant):
    """The control: without the plant the same oracle on the same model passes."""
    arch, oracles = KILLERS[mutant]
    model = make_tiny_model(arch)
    for name in oracles:
        ORACLES[name](model)
