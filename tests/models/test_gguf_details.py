"""GGUF import details: Gemma-3 K-quants and norms, unsupported archs, concurrent publishing."""

from __future__ import annotations

import json
import multiprocessing as mp

import mlx.core as mx
import numpy as np
import pytest

from mlxkv.errors import ModelLoadError
from mlxkv.models.gguf import CONVERTER_VERSION, SOURCE_FILE, _publish, convert_gguf


def _q8_0(raw: np.ndarray, shape) -> np.ndarray:
    """Independent Q8_0 decoder: 34-byte blocks = fp16 scale + 32 int8 values."""
    blocks = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    values = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * values).reshape(shape)


@pytest.fixture(scope="module")
def gemma3_pair(gemma3_gguf, gemma3_dir):
    import gguf

    reader = gguf.GGUFReader(str(gemma3_gguf))
    return {t.name: t for t in reader.tensors}, mx.load(str(gemma3_dir / "model.safetensors"))


@pytest.mark.parametrize(
    ("gguf_name", "hf_name", "qtype"),
    [
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", "Q4_K"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", "Q6_K"),
        ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight", "Q5_0"),
    ],
)
def test_gemma3_kquant_tensors_equal_gguf_dequantize(gemma3_pair, gguf_name, hf_name, qtype):
    from gguf import quants

    tensors, ours = gemma3_pair
    t = tensors[gguf_name]
    assert t.tensor_type.name == qtype
    ref = quants.dequantize(t.data, t.tensor_type).reshape(ours[hf_name].shape)
    assert np.array_equal(ref.astype(np.float32), np.array(ours[hf_name]))
    assert float(np.abs(ref).max()) > 0  # a real, non-zero weight


def test_gemma3_q8_0_matches_independent_decoder(gemma3_pair):
    tensors, ours = gemma3_pair
    t = tensors["blk.4.attn_v.weight"]
    assert t.tensor_type.name == "Q8_0"
    shape = ours["model.layers.4.self_attn.v_proj.weight"].shape
    assert np.array_equal(
        _q8_0(t.data, shape), np.array(ours["model.layers.4.self_attn.v_proj.weight"])
    )


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("output_norm.weight", "model.norm.weight"),
        ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
        ("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
    ],
)
def test_gemma3_norms_stored_as_one_plus_w(gemma3_pair, gguf_name, hf_name):
    tensors, ours = gemma3_pair
    stored = np.asarray(tensors[gguf_name].data, dtype=np.float32)
    assert np.allclose(stored - 1.0, np.array(ours[hf_name]), atol=1e-6)


def test_gemma3_config_defaults(gemma3_dir):
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["sliding_window_pattern"] == 6
    assert config["rope_local_base_freq"] == 10000.0
    assert config["num_hidden_layers"] == 18 and config["tie_word_embeddings"] is True


def _tiny_gguf(path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_rejected_cleanly(tmp_path):
    src = tmp_path / "bert.gguf"
    _tiny_gguf(src, "bert")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'bert'"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.gguf"]


def test_publish_keeps_first_complete_folder(tmp_path):
    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, tag in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(tag)
        (folder / "model.safetensors").write_text("")
        (folder / SOURCE_FILE).write_text(json.dumps({"converter_version": CONVERTER_VERSION}))
    _publish(first, out)
    _publish(second, out)  # lost the race: discarded, the published folder is untouched
    assert (out / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _convert_worker(args):
    src, out = args
    convert_gguf(src, out, progress=False)
    return json.loads((out / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.slow
def test_concurrent_conversions_of_one_gguf(tmp_path, smollm2_gguf):
    out = tmp_path / "models" / "smol"
    with mp.get_context("spawn").Pool(2) as pool:
        layers = pool.map(_convert_worker, [(smollm2_gguf, out)] * 2)
    assert layers == [30, 30]
    assert sorted(p.name for p in out.parent.iterdir()) == ["smol"]
