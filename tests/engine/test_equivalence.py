"""Every data-plane equivalence, compared on per-step logits, on every tiny architecture.

The oracles live in tests/oracles.py; tests/mutation/ proves each can fail.
"""

from __future__ import annotations

import pytest
from oracles import ORACLES, codec_vs_decode_then_attend

from mlxkv.models.tiny import TINY_CONFIGS, make_tiny_model


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def model(request):
    return make_tiny_model(request.param)


@pytest.mark.parametrize("oracle", sorted(ORACLES))
def test_equivalence(model, oracle):
    ORACLES[oracle](model)


@pytest.fixture(scope="module")
def wide():
    """head_dim 64: the affine codecs group 64 coordinates."""
    return make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                           hidden_size=128)


# The engine's K/V and the reference's differ by fp32 noise (~1e-6); a value that sits on
# an affine rounding boundary may take the neighbouring code (one quantum), which moves
# the sharp model's logits by ~1e-3, and later steps compound it (int8 reaches ~2e-2 by
# step 4). The planted bugs of tests/mutation move them by 3 to 36.
@pytest.mark.parametrize(("spec", "atol"), [
    ("fp32", 1e-3), ("fp16", 1e-2), ("bf16", 1e-1), ("int8", 0.1), ("int4", 0.25),
    ("e8:k4v3", 1e-3), ("e8:k2v4", 1e-3), ("d4:k4v3", 1e-3), ("d4:k3v2", 1e-3),
    ("lloyd:k4v3", 1e-3), ("lloyd:k2v3", 1e-3), ("int8,boundary=1", 0.1),
    # rates 5..8 (64-bit block words) and int6/int3: the same reasoning; a flipped lattice
    # or Lloyd cell moves a coordinate by one (smaller) step, an affine flip by one quantum
    ("e8:k8v5", 1e-3), ("d4:k6v7", 1e-3), ("lloyd:k7v5", 1e-3), ("int6", 0.1),
    ("int3", 0.25), ("e8:k5v6,l0=int8,l1=lloyd:k6v5", 0.1),
])
def test_codec_equals_decode_then_attend(wide, spec, atol):
    codec_vs_decode_then_attend(wide, spec, atol)
