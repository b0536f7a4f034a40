"""Sensitivity profiles (mlxkv.kv_profile) on a tiny model, and auto:<R>x built from one."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxkv.cli import main as cli_main
from mlxkv.codec import parse_kv_codec
from mlxkv.codec.allocate import allocate
from mlxkv.kv_profile import TopKReference, profile_model, write_profile
from mlxkv.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def wide():
    return make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                           hidden_size=128)


def test_profile_measures_every_tensor_and_drives_auto(wide, tmp_path):
    windows = [[(5 * i + 3 * j) % 120 + 1 for i in range(24)] for j in range(2)]
    prof = profile_model(wide, windows, rates=(3,))
    n = len(wide.layers)
    assert [len(prof["kl"][kv]) for kv in ("k", "v")] == [n, n]
    kls = [prof["kl"][kv][i]["3"] for kv in ("k", "v") for i in range(n)]
    assert all(k > 0 for k in kls)  # coding any one tensor moves the distribution
    assert prof["layers"][0] == {"head_dim": 64, "num_kv_heads": 1, "sliding_window": None}
    path = write_profile(prof, tmp_path / "tiny.json")
    layers = parse_kv_codec(f"auto:3.0x,profile={path}", n)
    assert [(layers[i][0].bits, layers[i][1].bits) for i in range(n)] == allocate(prof, 3.0)


def test_top_k_kl_is_zero_for_itself_and_positive_otherwise():
    logits = mx.random.normal((3, 5, 200), key=mx.random.key(1)) * 3
    ref = TopKReference.of(logits, k=16)
    assert mx.max(mx.abs(ref.kl(logits))).item() < 1e-5
    moved = logits + mx.random.normal(logits.shape, key=mx.random.key(2))
    assert mx.min(ref.kl(moved)).item() > 0


def test_profile_cli_needs_a_text(tmp_path, capsys):
    code = cli_main(["profile-kv", "--model", "smollm2-135m-instruct", "--text",
                     str(tmp_path / "missing.txt")])
    assert code == 2 and "not found" in capsys.readouterr().err
