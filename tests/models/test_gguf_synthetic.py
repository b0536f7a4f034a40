"""Qwen2 / Qwen3 GGUF import on tiny synthetic files (no such model ships on PyPI).

The files are written with the gguf package itself: random Q8_0 / F32 weights and a
byte-level BPE vocabulary with two merges. The result must load with mlx_lm.load, keep Q/K
rows unpermuted (only llama checkpoints are permuted by llama.cpp) and tokenize with the merges.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.models.gguf import convert_gguf

V_EXTRA = ["he", "ll", "<|endoftext|>"]
H, NH, KV, HD, F, L = 64, 4, 2, 16, 128, 2


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable-character table (256 entries)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def _write(path, arch: str) -> dict[str, np.ndarray]:
    import gguf

    tokens = _byte_chars() + V_EXTRA
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in (
        (w.add_block_count, L),
        (w.add_context_length, 256),
        (w.add_embedding_length, H),
        (w.add_feed_forward_length, F),
        (w.add_head_count, NH),
        (w.add_head_count_kv, KV),
        (w.add_key_length, HD),
        (w.add_value_length, HD),
        (w.add_layer_norm_rms_eps, 1e-6),
        (w.add_rope_freq_base, 1e6),
        (w.add_tokenizer_model, "gpt2"),
        (w.add_tokenizer_pre, "qwen2"),
        (w.add_token_list, tokens),
        (w.add_token_types, [1] * (len(tokens) - 1) + [3]),
        (w.add_token_merges, ["h e", "l l"]),
        (w.add_eos_token_id, len(tokens) - 1),
    ):
        add(value)
    raw = {}

    def tensor(name, shape, quant=True):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quant:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)
        raw[name] = a

    tensor("token_embd.weight", (len(tokens), H))
    tensor("output_norm.weight", (H,), quant=False)
    for i in range(L):
        p = f"blk.{i}."
        for name, shape in (
            ("attn_q", (NH * HD, H)),
            ("attn_k", (KV * HD, H)),
            ("attn_v", (KV * HD, H)),
            ("attn_output", (H, NH * HD)),
            ("ffn_gate", (F, H)),
            ("ffn_up", (F, H)),
            ("ffn_down", (H, F)),
        ):
            tensor(f"{p}{name}.weight", shape)
        for name, n in (("attn_norm", H), ("ffn_norm", H)):
            tensor(f"{p}{name}.weight", (n,), quant=False)
        if arch == "qwen2":
            for name, n in (("attn_q", NH * HD), ("attn_k", KV * HD), ("attn_v", KV * HD)):
                tensor(f"{p}{name}.bias", (n,), quant=False)
        else:
            tensor(f"{p}attn_q_norm.weight", (HD,), quant=False)
            tensor(f"{p}attn_k_norm.weight", (HD,), quant=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_converts_and_loads_with_mlx_lm(tmp_path, arch):
    from mlx_lm import load

    raw = _write(tmp_path / f"{arch}.gguf", arch)
    folder = convert_gguf(tmp_path / f"{arch}.gguf", tmp_path / "out", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch and config["rope_theta"] == 1e6
    ours = mx.load(str(folder / "model.safetensors"))
    q = np.array(ours["model.layers.1.self_attn.q_proj.weight"])
    assert np.abs(q - raw["blk.1.attn_q.weight"]).max() < 2e-3  # Q8_0 error only, unpermuted
    norm = np.array(ours["model.layers.0.input_layernorm.weight"])
    assert np.array_equal(norm, raw["blk.0.attn_norm.weight"])  # no Gemma 1+w shift
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    else:
        assert "model.layers.0.self_attn.k_norm.weight" in ours
    model, tok = load(str(folder))
    ids = tok.encode("hello")
    assert ids[:2] == [256, 257]  # the merges "he", "ll" were applied
    assert tok.decode(ids) == "hello"
    logits = model(mx.array(ids)[None])
    assert logits.shape == (1, len(ids), 256 + len(V_EXTRA))
    assert bool(mx.all(mx.isfinite(logits)).item())
