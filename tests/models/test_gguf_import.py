"""GGUF import: converted weights vs independent dequantisation, logits vs mlx-lm, bad files."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.errors import ModelLoadError, ModelNotFoundError
from mlxkv.models.gguf import convert_gguf, unpermute_qk
from mlxkv.models.loader import load_model, resolve_model_dir


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8 * 3, 4)
    heads = 3
    permuted = w.reshape(heads, 2, 4, 4).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's order
    assert np.array_equal(unpermute_qk(permuted, heads), w)


def test_smollm2_weights_equal_mlx_own_gguf_dequantisation(smollm2_gguf, smollm2_dir):
    """mx.load reads Q4_1/Q8_0 GGUF tensors itself: an independent check of our conversion."""
    packed = mx.load(str(smollm2_gguf))  # mlx's own GGUF reader: quantized weight/scales/biases

    def dequant(name):
        base = name[: -len(".weight")]
        if f"{base}.scales" not in packed:
            return packed[name].astype(mx.float32)
        w, scales = packed[name], packed[f"{base}.scales"]
        bits = 32 * w.shape[1] // (scales.shape[1] * 32)
        return mx.dequantize(w, scales, packed[f"{base}.biases"], group_size=32, bits=bits).astype(
            mx.float32
        )

    raw = {k: dequant(k) for k in packed if k.endswith(".weight")}
    ours = mx.load(str(smollm2_dir / "model.safetensors"))
    config = json.loads((smollm2_dir / "config.json").read_text())
    checks = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight",
    }
    for gguf_name, hf_name in checks.items():
        assert mx.allclose(raw[gguf_name].astype(mx.float32), ours[hf_name], atol=1e-3).item()
    q_raw = np.array(raw["blk.5.attn_q.weight"].astype(mx.float32))
    q_ours = np.array(ours["model.layers.5.self_attn.q_proj.weight"])
    assert np.allclose(unpermute_qk(q_raw, config["num_attention_heads"]), q_ours, atol=1e-3)
    assert not np.allclose(q_raw, q_ours, atol=1e-3)  # the permutation really was undone


def test_gemma3_config_from_metadata(gemma3_dir):
    # The 1 + w norm fix is exercised by the coherent-text and logits tests below: without
    # it Gemma's every norm is off by one and its text is garbage.
    weights = mx.load(str(gemma3_dir / "model.safetensors"))
    assert weights["model.layers.0.input_layernorm.weight"].dtype == mx.float32
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 512
    assert config["num_key_value_heads"] == 1 and config["head_dim"] == 256


@pytest.mark.parametrize("fixture", ["smollm2_dir", "gemma3_dir"])
def test_load_model_logits_equal_mlx_lm(fixture, request):
    from mlx_lm import load

    folder = request.getfixturevalue(fixture)
    ours = load_model(str(folder), progress=False)
    model, tok = load(str(folder))
    model.set_dtype(mx.float32)
    ids = mx.array(tok.encode("The capital of France is"))[None]
    assert mx.allclose(ours.model(ids), model(ids), atol=1e-5).item()


def test_greedy_text_is_coherent(smollm2_dir, gemma3_dir):
    from mlx_lm import generate

    smol = load_model(str(smollm2_dir), progress=False)
    assert "Paris" in generate(smol.model, smol.tokenizer, "The capital of France is", max_tokens=8)
    gem = load_model(str(gemma3_dir), progress=False)
    text = generate(gem.model, gem.tokenizer, "The capital of France is", max_tokens=12)
    assert "France" in text or "Paris" in text
    assert gem.tokenizer.encode("hi")[0] == 2  # Gemma adds BOS


def test_smollm2_tokenizer_and_chat_template(smollm2_dir):
    tok = load_model(str(smollm2_dir), progress=False).tokenizer
    text = "Digits 12345, accents éà, tabs\tand emoji 😀."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert "<|im_start|>assistant" in tok.decode(ids)


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"\x00" * 4096])
def test_corrupt_gguf_is_rejected_cleanly(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_truncated_gguf_is_rejected(tmp_path, smollm2_gguf):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[:5_000_000])
    with pytest.raises(ModelLoadError):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunc.gguf"]


def test_unknown_model_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face"):
        resolve_model_dir("some-org/some-model")


def test_gguf_file_spec_converts_once_into_cache(tmp_path, smollm2_gguf):
    first = resolve_model_dir(str(smollm2_gguf), cache_dir=tmp_path, progress=False)
    assert first.parent == tmp_path / "models" and (first / "model.safetensors").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = resolve_model_dir(str(smollm2_gguf), cache_dir=tmp_path, progress=False)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_hub_id_fails_cleanly_when_hub_raises(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="connection refused"):
        resolve_model_dir("org/model")
