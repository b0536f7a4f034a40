"""Rotated Lloyd-Max scalar codec (TurboQuant-style baseline), 2..8 bits per coordinate.

Per vector: y = R x (seeded Hadamard), s = fp16(rms(y)), each coordinate of y / s
quantised to the nearest of the 2^m Lloyd-Max levels of a unit Gaussian times a gain g_m
(fitted on captured K/V, `benchmarks/fit_steps.py`), packed m bits per coordinate: one
little-endian word of m bytes per 8 coordinates. Components as the lattice codec.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import mlx.core as mx
import numpy as np

from mlxkv.codec.base import LLOYD, KernelLayout
from mlxkv.codec.lattice import RATES, _pack_words, _unpack_words, word_dtype
from mlxkv.codec.rotation import rotate, unrotate

# Gain g_m on the Gaussian levels, fitted like the lattice steps (results/fit_steps.json).
_GAIN = {2: 0.9727, 3: 0.9727, 4: 0.9727, 5: 0.9461, 6: 0.9461, 7: 0.9461, 8: 0.9202}


@lru_cache(maxsize=16)
def _gaussian_levels(bits: int) -> tuple[float, ...]:
    """Lloyd-Max levels of N(0, 1) for 2^bits cells: Lloyd's iteration with exact cell
    centroids (phi(a) - phi(b)) / (Phi(b) - Phi(a))."""
    n = 2**bits
    # Panter-Dite start (point density ~ pdf^(1/3)): already close, so Lloyd converges fast
    lv = np.array([math.sqrt(3.0) * NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    cdf = np.vectorize(lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))))
    for _ in range(500):
        edges = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
        pdf = np.exp(-0.5 * np.nan_to_num(edges, posinf=60, neginf=-60) ** 2) / math.sqrt(
            2 * math.pi)
        mass = np.maximum(np.diff(cdf(edges)), 1e-300)
        new = (pdf[:-1] - pdf[1:]) / mass
        if np.max(np.abs(new - lv)) < 1e-9:
            break
        lv = new
    lv = (lv - lv[::-1]) / 2  # exactly symmetric
    return tuple(float(v) for v in lv)


def levels(bits: int, gain: float = 1.0) -> mx.array:
    """The 2^bits reconstruction levels, ascending, in units of the vector's RMS."""
    return mx.array(_gaussian_levels(bits), dtype=mx.float32) * gain


@lru_cache(maxsize=64)
def _fp32_levels(bits: int, gain: float) -> tuple[float, ...]:
    return tuple(levels(bits, gain).tolist())


class LloydCodec:
    def __init__(self, bits: int = 4, seed: int = 0, gain: float | None = None):
        if bits not in RATES:
            raise ValueError("lloyd codec bits must be 2..8")
        self.bits, self.seed = bits, seed
        self.gain = _GAIN[bits] if gain is None else gain
        self.name = f"lloydm{bits}"

    @property
    def metadata(self) -> dict:
        return {"codec": "lloyd", "m": self.bits, "seed": self.seed, "gain": self.gain}

    @property
    def kernel_layout(self) -> KernelLayout:
        # The float32 levels encode and decode use (fp32 levels times fp32 gain), exactly:
        # a kernel rebuilding them from this tuple gets the codec's own thresholds.
        return KernelLayout(LLOYD, self.bits, {"codes": "codes", "scales": "scale"},
                            rotation_seed=self.seed,
                            levels=_fp32_levels(self.bits, self.gain))

    def packed_spec(self, head_dim: int, dtype: mx.Dtype):
        if head_dim % 8:
            raise ValueError(f"lloyd codec needs head_dim % 8 == 0, got {head_dim}")
        return {"codes": ((head_dim // 8 * self.bits,), mx.uint8), "scale": ((1,), mx.float16)}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return head_dim // 8 * self.bits + 2

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        y = rotate(x, self.seed)
        s = mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True)).astype(mx.float16)
        t = y / mx.maximum(s.astype(mx.float32), 1e-30)
        lv = levels(self.bits, self.gain)
        # nearest level = number of midpoints below t (levels ascending)
        mids = (lv[1:] + lv[:-1]) / 2
        idx = mx.sum(t[..., None] > mids, axis=-1).astype(word_dtype(self.bits))
        idx = idx.reshape(*idx.shape[:-1], -1, 8)
        word = mx.zeros(idx.shape[:-1], dtype=idx.dtype)
        for i in range(8):
            word = word | (idx[..., i] << (self.bits * i))
        return {"codes": _pack_words(word, self.bits), "scale": s}

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        w = _unpack_words(packed["codes"], self.bits)
        mask = 2**self.bits - 1
        idx = mx.stack([(w >> (self.bits * i)) & mask for i in range(8)], axis=-1)
        y = levels(self.bits, self.gain)[idx.reshape(*idx.shape[:-2], -1).astype(mx.uint32)]
        y = y * packed["scale"].astype(mx.float32)
        return unrotate(y, self.seed).astype(dtype)
