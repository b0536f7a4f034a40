"""GGUF -> MLX/HF folder conversion (llama, gemma3, qwen2, qwen3), torch-free.

Every tensor type the `gguf` package can dequantize (K-quants included) is turned into
float32 (or the requested dtype) and written as `model.safetensors`, next to a
`config.json` built from the GGUF metadata and a `tokenizer.json` rebuilt from the GGUF
vocabulary, so that `mlx_lm.load(folder)` works on the result. Conversion facts:
llama.cpp permutes Q/K rows of llama checkpoints (undone here) and stores Gemma norm
weights as 1 + w (1 is subtracted). The output is written to a temporary sibling folder
and renamed into place, so a failed conversion leaves nothing behind. Each folder records
the CONVERTER_VERSION that wrote it (in mlxkv_source.json); `is_converted` accepts only the
current version, so a folder from an older converter is converted again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlxkv.errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "gemma3", "qwen2", "qwen3")
# NOTE: bump whenever the converted output changes (tensors, config.json, tokenizer files).
CONVERTER_VERSION = 1
SOURCE_FILE = "mlxkv_source.json"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per layer; llama.cpp's ffn_norm is its pre-feed-forward norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_name(arch: str, gguf_name: str) -> str:
    """Map a llama.cpp tensor name (`blk.3.attn_q.weight`) to its HF name."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base, suffix = parts[2], ".".join(parts[3:])
        table = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
        if base not in table:
            raise ModelLoadError(f"unsupported GGUF tensor {gguf_name!r} for arch {arch}")
        return f"model.layers.{parts[1]}.{table[base]}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    if base not in _GLOBAL_NAMES:
        raise ModelLoadError(f"unsupported GGUF tensor {gguf_name!r} for arch {arch}")
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of a llama Q or K projection.

    llama.cpp stores rows per head as (half, 2) pairs; HF checkpoints as (2, half).
    """
    out_dim = weight.shape[0]
    half = out_dim // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """Any GGUF tensor (F32/F16/BF16/Q*/K-quants) as a float32 numpy array in HF shape."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize"
        ) from exc
    return np.asarray(data, dtype=np.float32).reshape(shape)


def read_config(reader) -> dict:
    """config.json for mlx-lm from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "architectures": [],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": not has_output,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "gemma3":
        config.update(
            sliding_window=int(get("attention.sliding_window", 512)),
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=head_dim,
        )
    return config


def convert_tensors(reader, config: dict, progress: bool) -> dict[str, np.ndarray]:
    """Dequantize and rename every tensor; apply the per-architecture fixes."""
    from tqdm import tqdm

    arch = _field(reader, "general.architecture")
    out: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        name = hf_name(arch, tensor.name)
        weight = dequantize_tensor(tensor)
        if arch == "llama" and name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1.0
        out[name] = weight
    return out


def write_tokenizer(reader, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the GGUF vocabulary and special ids."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    arch = _field(reader, "general.architecture")
    groups = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {
            name: _field(reader, f"tokenizer.{key}")
            for key, name in renames.items()
            if f"tokenizer.{key}" in reader.fields
        }
    tokens = groups["tokenizer"]["tokens"]
    backend, _ = convert_gguf_tokenizer(arch, groups["tokenizer"])
    tok_config = dict(groups["tokenizer_config"])
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            tok_config[name] = tokens[token_id]
    tok_config.setdefault("add_bos_token", False)
    tok_config.setdefault("add_eos_token", False)
    if tok_config["add_bos_token"] and tok_config.get("bos_token"):
        _bake_bos(backend, tok_config["bos_token"], tokens.index(tok_config["bos_token"]))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_max_length"] = int(_field(reader, f"{arch}.context_length", 4096))
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def _bake_bos(backend, bos: str, bos_id: int) -> None:
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def open_gguf(path: Path):
    """A GGUFReader, or ModelLoadError naming the file when it is not a readable GGUF."""
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        _ = [t.data.shape for t in reader.tensors]
    except Exception as exc:  # the gguf reader raises many types on corrupt input
        raise ModelLoadError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    if "general.architecture" not in reader.fields or "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelLoadError(f"{path} lacks GGUF architecture or tokenizer metadata")
    return reader


def converter_version(folder: Path) -> int | None:
    """The CONVERTER_VERSION recorded in folder, or None when it has none (or no marker)."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text()).get("converter_version")
    except (OSError, ValueError, AttributeError):
        return None


def is_converted(folder) -> bool:
    """True when folder is a complete conversion written by this CONVERTER_VERSION."""
    folder = Path(folder)
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and converter_version(folder) == CONVERTER_VERSION
    )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; if another process published a current folder first, keep it.

    A stale out_dir (incomplete, or from another converter version) is first renamed aside
    and then deleted, so out_dir is only ever a complete folder or briefly absent.
    """
    if is_converted(out_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.rename(out_dir, trash / out_dir.name)
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_converted(out_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an identical conversion


def convert_gguf(gguf_path, out_dir, *, dtype: str = "float32", progress: bool = True) -> Path:
    """Convert a GGUF file into an MLX/HF folder at out_dir (atomically).

    The folder is built in a temporary sibling and renamed into place; when another process
    already published a current out_dir, that one is kept (conversions are deterministic),
    while a stale one (see `is_converted`) is replaced.

    Returns:
        out_dir, holding config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    Raises:
        ModelLoadError: unreadable/corrupt file, unsupported architecture or tensor type.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    config = read_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = convert_tensors(reader, config, progress)
        mx_dtype = getattr(mx, dtype)
        arrays = {k: mx.array(v).astype(mx_dtype) for k, v in tensors.items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), arrays, metadata={"format": "mlx"})
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(reader, tmp)
        source = {
            "gguf": gguf_path.name,
            "size": gguf_path.stat().st_size,
            "converter_version": CONVERTER_VERSION,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source))
        _publish(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelLoadError | KeyboardInterrupt):
            raise
        raise ModelLoadError(f"converting {gguf_path.name} failed: {exc}") from exc
    return out_dir
