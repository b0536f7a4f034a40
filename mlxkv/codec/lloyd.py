"""Rotated Lloyd-Max scalar codec (TurboQuant-style baseline).

Per vector: y = R x (seeded Hadamard), s = fp16(rms(y)), each coordinate of y / s
quantised to the nearest of the 2^m Lloyd-Max levels of a unit Gaussian, packed m bits
per coordinate (m bytes per 8 coordinates). Components as the lattice codec.
"""

from __future__ import annotations

import mlx.core as mx

from mlxkv.codec.base import LLOYD, KernelLayout
from mlxkv.codec.lattice import _pack_words, _unpack_words
from mlxkv.codec.rotation import rotate, unrotate

# Lloyd-Max optimal levels for N(0, 1) (positive half; symmetric).
_LEVELS = {
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326),
}


def levels(bits: int) -> mx.array:
    pos = _LEVELS[bits]
    return mx.array([-v for v in reversed(pos)] + list(pos), dtype=mx.float32)


class LloydCodec:
    def __init__(self, bits: int = 4, seed: int = 0):
        if bits not in _LEVELS:
            raise ValueError("lloyd codec bits must be 2, 3 or 4")
        self.bits, self.seed = bits, seed
        self.name = f"lloydm{bits}"

    @property
    def metadata(self) -> dict:
        return {"codec": "lloyd", "m": self.bits, "seed": self.seed}

    @property
    def kernel_layout(self) -> KernelLayout:
        pos = _LEVELS[self.bits]
        return KernelLayout(LLOYD, self.bits, {"codes": "codes", "scales": "scale"},
                            rotation_seed=self.seed,
                            levels=tuple(-v for v in reversed(pos)) + pos)

    def packed_spec(self, head_dim: int, dtype: mx.Dtype):
        return {"codes": ((head_dim // 8 * self.bits,), mx.uint8), "scale": ((1,), mx.float16)}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return head_dim // 8 * self.bits + 2

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        y = rotate(x, self.seed)
        s = mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True)).astype(mx.float16)
        t = y / mx.maximum(s.astype(mx.float32), 1e-30)
        idx = mx.argmin(mx.abs(t[..., None] - levels(self.bits)), axis=-1).astype(mx.uint32)
        idx = idx.reshape(*idx.shape[:-1], -1, 8)
        word = mx.zeros(idx.shape[:-1], dtype=mx.uint32)
        for i in range(8):
            word = word | (idx[..., i] << (self.bits * i))
        return {"codes": _pack_words(word, self.bits), "scale": s}

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        w = _unpack_words(packed["codes"], self.bits)
        mask = 2**self.bits - 1
        idx = mx.stack([(w >> (self.bits * i)) & mask for i in range(8)], axis=-1)
        y = levels(self.bits)[idx.reshape(*idx.shape[:-2], -1)]
        y = y * packed["scale"].astype(mx.float32)
        return unrotate(y, self.seed).astype(dtype)
