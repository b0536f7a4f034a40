"""Pure-mx fast Walsh-Hadamard transform (Sylvester order), shared by the reference twins."""

from __future__ import annotations

import mlx.core as mx


def hadamard_unnormalised(x: mx.array) -> mx.array:
    """H_D x over the last axis (D a power of two), H[i, j] = (-1)^popcount(i & j), fp32."""
    D = x.shape[-1]
    if D <= 0 or D & (D - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {D}")
    y = x.astype(mx.float32)
    lead = y.shape[:-1]
    half = 1
    while half < D:
        y = y.reshape(*lead, D // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = mx.stack([a + b, a - b], axis=-2)
        half *= 2
    return y.reshape(*lead, D)


def rotation_signs(rotation: mx.array) -> mx.array:
    """sigma [D] of R = H diag(sigma) / sqrt(D): row 0 of H is all ones, so R[0] = sigma/sqrt(D)."""
    D = rotation.shape[-1]
    return mx.sign(rotation[0] * (D**0.5)).astype(mx.float32)
