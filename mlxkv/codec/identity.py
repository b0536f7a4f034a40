"""Identity codec: vectors stored as they are, in the KV dtype (or a fixed one). Parity anchor.

Packed layout per vector: {"x": [head_dim] dtype}.
"""

from __future__ import annotations

import mlx.core as mx

from mlxkv.codec.base import IDENTITY, KernelLayout


class IdentityCodec:
    """Stores vectors unchanged; `dtype` None keeps the model's KV dtype (exact mlx-lm parity)."""

    def __init__(self, dtype: mx.Dtype | None = None) -> None:
        self.dtype = dtype
        self.name = "identity" if dtype is None else {mx.float16: "fp16", mx.float32: "fp32", mx.bfloat16: "bf16"}[dtype]

    @property
    def metadata(self) -> dict:
        return {"codec": self.name}

    @property
    def kernel_layout(self) -> KernelLayout:
        bits = 0 if self.dtype is None else 8 * self.dtype.size
        return KernelLayout(IDENTITY, bits, {"values": "x"})

    def _store_dtype(self, dtype: mx.Dtype) -> mx.Dtype:
        return self.dtype or dtype

    def packed_spec(self, head_dim: int, dtype: mx.Dtype) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        return {"x": ((head_dim,), self._store_dtype(dtype))}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return head_dim * self._store_dtype(dtype).size

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        return {"x": x if self.dtype is None else x.astype(self.dtype)}

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        return packed["x"].astype(dtype)
