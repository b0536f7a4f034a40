"""KV codecs: identity (parity anchor), affine int8/int4, rotated scalar, E8/D4 lattice."""

from mlxkv.codec.base import KVCodec
from mlxkv.codec.identity import IdentityCodec

__all__ = ["IdentityCodec", "KVCodec"]
