"""Seeded random-sign Hadamard rotation R = H_D diag(sigma) / sqrt(D) (orthonormal).

Applied to post-RoPE K and to V before quantisation. Because R is orthonormal,
q.k = (Rq).(Rk): a kernel may rotate the query once and accumulate V in the rotated
domain, un-rotating the output once. D must be a power of two (64, 128, 256, ...).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np


@lru_cache(maxsize=32)
def _rotation_np(dim: int, seed: int) -> np.ndarray:
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {dim}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=dim)
    return (h * signs[None, :] / np.sqrt(dim)).astype(np.float32)


def rotation_matrix(dim: int, seed: int) -> mx.array:
    """R [dim, dim]: rotated = x @ R.T, and x = rotated @ R."""
    return mx.array(_rotation_np(dim, seed))


def rotate(x: mx.array, seed: int) -> mx.array:
    """R x for vectors x [..., D] (computed in float32)."""
    r = rotation_matrix(x.shape[-1], seed)
    return x.astype(mx.float32) @ r.T


def unrotate(y: mx.array, seed: int) -> mx.array:
    """R^T y: the inverse rotation."""
    return y.astype(mx.float32) @ rotation_matrix(y.shape[-1], seed)
