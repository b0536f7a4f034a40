"""Round-trip storage of a codec, for fast quality measurement.

`RoundTripCodec(inner)` stores `inner.decode(inner.encode(x))` in the KV dtype. Every
reader of a packed pool computes exactly these values (decode is a pure function of the
stored components), so attention over a round-trip pool equals attention over the packed
pool (tests/codec/test_roundtrip.py), while the dense decode paths (the compiled CPU
primitive, the Metal dense kernel) read it without a per-step decode of the whole context.
Bytes are reported as the inner codec's: the pool itself is a full-precision stand-in.
"""

from __future__ import annotations

import mlx.core as mx

from mlxkv.codec.base import KVCodec
from mlxkv.codec.identity import IdentityCodec


class RoundTripCodec(IdentityCodec):
    """Identity layout holding `inner`'s reconstruction; bytes and metadata are `inner`'s."""

    def __init__(self, inner: KVCodec) -> None:
        super().__init__(None)
        self.inner = inner
        self.name = f"roundtrip:{inner.name}"

    @property
    def metadata(self) -> dict:
        return {"roundtrip": True, **self.inner.metadata}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return self.inner.bytes_per_vector(head_dim, dtype)

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        return {"x": self.inner.decode(self.inner.encode(x), x.dtype)}


def round_trip_layers(layers: dict[int, tuple[KVCodec, KVCodec]] | None):
    """The same per-layer codecs with every non-identity codec wrapped in RoundTripCodec."""
    if layers is None:
        return None

    def wrap(codec: KVCodec) -> KVCodec:
        return codec if isinstance(codec, IdentityCodec) else RoundTripCodec(codec)

    return {i: (wrap(k), wrap(v)) for i, (k, v) in layers.items()}
