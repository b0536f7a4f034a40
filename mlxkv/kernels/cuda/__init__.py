"""CUDA twins of the Metal bodies for MLX's CUDA backend (mx.fast.cuda_kernel); see source.py."""

from __future__ import annotations

from mlxkv.kernels.cuda.source import assemble, run_cuda

__all__ = ["assemble", "run_cuda"]
