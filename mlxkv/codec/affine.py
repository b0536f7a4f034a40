"""Affine int codec (int8/int6/int5/int4/int3/int2), group 64 (mlx-lm's QuantizedKVCache
scheme): the baseline.

Per group of 64 coordinates: q = round((x - bias) / scale) in [0, 2^bits), with fp16
scale and bias (mx.quantize's affine mode). Components: {"q": [D*bits/32] uint32,
"scales": [D/64] float16, "biases": [D/64] float16}.
"""

from __future__ import annotations

import mlx.core as mx

from mlxkv.codec.base import AFFINE, KernelLayout

AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # the widths mx.quantize packs


class AffineCodec:
    def __init__(self, bits: int = 8, group_size: int = 64):
        if bits not in AFFINE_BITS:
            raise ValueError(f"affine codec bits must be one of {AFFINE_BITS}")
        self.bits, self.group_size = bits, group_size
        self.name = f"int{bits}"

    @property
    def metadata(self) -> dict:
        return {"codec": "affine", "bits": self.bits, "group_size": self.group_size}

    @property
    def kernel_layout(self) -> KernelLayout:
        return KernelLayout(AFFINE, self.bits,
                            {"codes": "q", "scales": "scales", "biases": "biases"},
                            group_size=self.group_size)

    def _groups(self, head_dim: int) -> int:
        if head_dim % self.group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of {self.group_size}")
        return head_dim // self.group_size

    def packed_spec(self, head_dim: int, dtype: mx.Dtype):
        g = self._groups(head_dim)
        return {"q": ((head_dim * self.bits // 32,), mx.uint32),
                "scales": ((g,), mx.float16), "biases": ((g,), mx.float16)}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return head_dim * self.bits // 8 + 4 * self._groups(head_dim)

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d).astype(mx.float16).astype(mx.float32)
        q, scales, biases = mx.quantize(flat, group_size=self.group_size, bits=self.bits)
        return {"q": q.reshape(*lead, -1),
                "scales": scales.astype(mx.float16).reshape(*lead, -1),
                "biases": biases.astype(mx.float16).reshape(*lead, -1)}

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        q = packed["q"]
        lead = q.shape[:-1]
        x = mx.dequantize(q.reshape(-1, q.shape[-1]),
                          packed["scales"].reshape(-1, packed["scales"].shape[-1]).astype(
                              mx.float32),
                          packed["biases"].reshape(-1, packed["biases"].shape[-1]).astype(
                              mx.float32),
                          group_size=self.group_size, bits=self.bits)
        return x.reshape(*lead, -1).astype(dtype)
