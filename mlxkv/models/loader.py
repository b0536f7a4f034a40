"""The one entry point for loading a model: `load_model(spec)`.

`spec` may be None (the embedded default), an embedded model name, a `.gguf` file
(converted once into the cache), a local MLX/HF folder, or a Hugging Face repo id (fetched
with huggingface_hub; this fails with a clear message when offline). The model itself is
an unchanged mlx-lm model class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxkv.config import DEFAULT_MODEL
from mlxkv.errors import ModelLoadError, ModelNotFoundError
from mlxkv.models.builtin import BUILTIN_MODELS, ensure_builtin, models_dir
from mlxkv.models.gguf import convert_gguf, is_converted


@dataclass
class LoadedModel:
    """An mlx-lm model + tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    model_dir: Path
    name: str


def _gguf_folder(path: Path, cache_dir, progress: bool) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = models_dir(cache_dir) / f"gguf-{path.stem}-{key[:10]}"
    if not is_converted(target):
        convert_gguf(path, target, progress=progress)
    return target


def _hub_folder(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub (offline or unknown repo?): "
            f"{reason[:200]}"
        ) from exc


def resolve_model_dir(spec: str | None, *, cache_dir=None, progress: bool = True) -> Path:
    """Folder holding config.json + weights for `spec` (see module docstring).

    Raises:
        ModelNotFoundError: nothing matches spec. ModelLoadError: it exists but cannot be used.
    """
    spec = spec or DEFAULT_MODEL
    if spec in BUILTIN_MODELS:
        return ensure_builtin(spec, cache_dir=cache_dir, progress=progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _gguf_folder(path, cache_dir, progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but has no config.json")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _hub_folder(spec)
    raise ModelNotFoundError(
        f"model {spec!r} not found: not an embedded model ({', '.join(BUILTIN_MODELS)}), "
        "a .gguf file, a local folder or a Hugging Face repo id"
    )


def default_dtype() -> str | None:
    """float32 on CPU (fp16/bf16 matmuls are slow there); the checkpoint's own dtype elsewhere."""
    import mlx.core as mx

    return "float32" if mx.default_device().type == mx.cpu else None


def load_model(
    spec: str | None = None, *, dtype=None, cache_dir=None, progress=True
) -> LoadedModel:
    """Load `spec` with mlx-lm (model classes unchanged), cast to `dtype` (default_dtype())."""
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    model_dir = resolve_model_dir(spec, cache_dir=cache_dir, progress=progress)
    try:
        model, tokenizer = mlx_lm_load(str(model_dir))
    except Exception as exc:
        raise ModelLoadError(f"mlx-lm could not load {model_dir}: {exc}") from exc
    dtype = dtype or default_dtype()
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    name = spec or DEFAULT_MODEL
    if Path(name).exists():
        name = Path(name).name
    return LoadedModel(model=model, tokenizer=tokenizer, model_dir=model_dir, name=name)
