"""mlxkv: an MLX inference engine and OpenAI-compatible server around a unified paged KV cache."""

from mlxkv._blas import maybe_preload_openblas

maybe_preload_openblas()

__version__ = "0.1.0"

__all__ = ["__version__"]
