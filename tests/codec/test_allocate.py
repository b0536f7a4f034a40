"""The greedy allocator: budgets met exactly, sensitive tensors kept wider, auto:<R>x specs,
and the kernels' refusal of rates they do not decode."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlxkv.codec import get_codec, parse_kv_codec
from mlxkv.codec.allocate import allocate, held_share, kl_at, predicted_kl, tensor_bytes
from mlxkv.errors import InvalidRequestError
from mlxkv.kernels.kv_encode import is_kernel_supported as encode_supported
from mlxkv.kernels.paged_attention_quant import codec_kind


def _profile(num_layers=4, head_dim=64, kv_heads=2, sens=None):
    sens = sens or [1.0] * num_layers
    geo = [{"head_dim": head_dim, "num_kv_heads": kv_heads, "sliding_window": None}
           for _ in range(num_layers)]
    return {"family": "e8", "rates": [4], "layers": geo,
            "kl": {"k": [{"4": 0.01 * s} for s in sens], "v": [{"4": 0.002 * s} for s in sens]}}


def test_kl_model_interpolates_and_extrapolates_at_six_db_per_bit():
    pts = {4: 0.08, 6: 0.004}
    assert kl_at(pts, 4) == 0.08 and kl_at(pts, 3) == pytest.approx(0.32)
    assert kl_at(pts, 5) == pytest.approx((0.08 * 0.004) ** 0.5)  # log-linear in between
    assert kl_at(pts, 8) == pytest.approx(0.004 / 16)


@pytest.mark.parametrize("ratio", [2.0, 3.0, 3.5, 5.0])
def test_allocation_meets_the_budget_with_the_least_waste(ratio):
    prof = _profile()
    rates = allocate(prof, ratio)
    used = sum(tensor_bytes(64, 2, k) + tensor_bytes(64, 2, v) for k, v in rates)
    fp16 = 4 * 2 * 2 * 64 * 2
    assert used <= fp16 / ratio
    # one bit more anywhere would break the budget (greedy stops at the first fit)
    assert used + 2 * 64 // 8 > fp16 / ratio


def test_sensitive_tensors_get_more_bits():
    prof = _profile(sens=[16.0, 1.0, 1.0, 4.0])
    rates = allocate(prof, 3.0)
    assert rates[0][0] >= rates[3][0] >= rates[1][0] == rates[2][0]
    assert all(k >= v for k, v in rates)  # K is 5x more sensitive than V in this profile
    uniform = [(6, 4)] * 4
    assert predicted_kl(prof, rates) <= predicted_kl(prof, uniform)


def test_auto_spec_reads_the_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_profile(sens=[16.0, 1.0, 1.0, 4.0])))
    layers = parse_kv_codec(f"auto:3.0x,profile={path},l3=int8", 4)
    expect = allocate(_profile(sens=[16.0, 1.0, 1.0, 4.0]), 3.0)
    assert [layers[i][0].bits for i in range(3)] == [k for k, _ in expect[:3]]
    assert layers[3][0].name == "int8"
    lloyd = parse_kv_codec(f"auto:3.0x,profile={path},family=lloyd", 4)
    assert [lloyd[i][0].name for i in range(4)] == [f"lloydm{k}" for k, _ in expect]
    with pytest.raises(InvalidRequestError):
        parse_kv_codec(f"auto:3.0x,profile={path}", 5)  # layer count mismatch
    with pytest.raises(InvalidRequestError):
        parse_kv_codec("auto:3.0x", 4, model_name="no-such-model")
    with pytest.raises(InvalidRequestError):
        parse_kv_codec(f"auto:9.0x,profile={path}", 4)  # beyond 2 bits everywhere


def _sliding_profile():
    """Gemma-like: layers 0-2 slide over 512 tokens, layer 3 attends to everything and is
    the most sensitive (so the per-token plan gives it the most bits)."""
    prof = _profile(sens=[1.0, 1.0, 1.0, 8.0])
    for g in prof["layers"][:3]:
        g["sliding_window"] = 512
    return prof


def _bytes_at(prof, rates, ctx):
    share = held_share(prof["layers"], ctx)
    return sum((tensor_bytes(64, 2, k) + tensor_bytes(64, 2, v)) * w
               for (k, v), w in zip(rates, share, strict=True))


def test_held_share_caps_sliding_layers_at_their_window():
    prof = _sliding_profile()
    assert held_share(prof["layers"], None) == [1.0] * 4
    assert held_share(prof["layers"], 256) == [1.0] * 4  # the window is not reached
    assert held_share(prof["layers"], 2048) == [0.25, 0.25, 0.25, 1.0]


def test_context_budget_moves_bits_from_full_to_sliding_layers():
    prof = _sliding_profile()
    per_token = allocate(prof, 3.0)
    at_128k = allocate(prof, 3.0, ctx=131072)
    fp16 = [2 * 2 * 64 * 2 * w for w in held_share(prof["layers"], 131072)]
    # the whole-sequence budget is met; the per-token plan misses it (its extra full-layer
    # bits are paid for by every one of the 128k tokens)
    assert _bytes_at(prof, at_128k, 131072) <= sum(fp16) / 3.0
    assert _bytes_at(prof, per_token, 131072) > sum(fp16) / 3.0
    assert at_128k[3][0] + at_128k[3][1] < per_token[3][0] + per_token[3][1]
    assert all(at_128k[i][0] >= per_token[i][0] for i in range(3))
    # at a context inside the window every layer holds every token: the per-token plan
    assert allocate(prof, 3.0, ctx=512) == per_token


def test_auto_spec_ctx_option(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_sliding_profile()))
    layers = parse_kv_codec(f"auto:3.0x,profile={path},ctx=131072", 4)
    expect = allocate(_sliding_profile(), 3.0, ctx=131072)
    assert [(layers[i][0].bits, layers[i][1].bits) for i in range(4)] == expect
    with pytest.raises(InvalidRequestError):
        parse_kv_codec(f"auto:3.0x,profile={path},ctx=long", 4)


@pytest.mark.parametrize("name", ["e8m5", "e8m8", "d4m6", "int6", "int3", "lloydm4"])
def test_kernels_refuse_rates_they_do_not_decode(name):
    codec = get_codec(name)
    assert codec_kind(codec) is None
    assert not encode_supported(mx.zeros((4, 64)), codec)


@pytest.mark.parametrize("name", ["e8m2", "e8m4", "d4m3", "int4", "int8"])
def test_kernels_keep_the_rates_they_decode(name):
    assert codec_kind(get_codec(name)) is not None
