"""The KV codec contract: how one K or V vector is stored in the paged pool.

A codec is stateless apart from its construction parameters (bits, seed). It turns
vectors `[..., head_dim]` into a dict of packed components `[..., *trailing]` and back.
The KVStore keeps one pool array per component and layer:

    pool[component]  # [num_blocks, block_size, num_kv_heads, *trailing]   dtype from packed_spec

`encode`/`decode` are pure mx and are the ground truth that kernels must match.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx


@runtime_checkable
class KVCodec(Protocol):
    """One way of storing a K or V vector.

    Attributes:
        name: registry name with its parameters, e.g. "identity", "int4", "e8m3".
        metadata: what must be recorded with the cache to decode it again (codec, m, seed).
    """

    name: str

    @property
    def metadata(self) -> dict: ...

    def packed_spec(
        self, head_dim: int, dtype: mx.Dtype
    ) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        """Per-vector components: name -> (trailing shape, dtype). `dtype` is the model's KV dtype."""
        ...

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        """Bytes one stored vector takes (codes + scales), for budgets and bytes/token reports."""
        ...

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        """x [..., head_dim] -> components [..., *trailing] as in packed_spec."""
        ...

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        """Components [..., *trailing] -> vectors [..., head_dim] in `dtype`."""
        ...
