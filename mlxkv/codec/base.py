"""The KV codec contract: how one K or V vector is stored in the paged pool.

A codec is stateless apart from its construction parameters (bits, seed). It turns
vectors `[..., head_dim]` into a dict of packed components `[..., *trailing]` and back.
The KVStore keeps one pool array per component and layer:

    pool[component]  # [num_blocks, block_size, num_kv_heads, *trailing]   dtype from packed_spec

`encode`/`decode` are pure mx and are the ground truth that kernels must match.

`kernel_layout` is the one contract between a codec and the kernels: it names the layout
family, bits, which pool component plays which role, the group size and rotation seed.
Dispatchers decide from it alone (never from the codec's class), and a family or bit
rate a kernel does not know simply goes to the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import mlx.core as mx

# Layout kinds (KernelLayout.kind).
IDENTITY, AFFINE, E8, D4, LLOYD = "identity", "affine", "e8", "d4", "lloyd"


@dataclass(frozen=True, slots=True)
class KernelLayout:
    """How one stored vector [D] is laid out in the pool components, for kernels.

    kind: IDENTITY (values as they are), AFFINE (per-group scale * q + bias), E8 / D4
        (lattice box codes x fp16 scale, in the rotated domain), LLOYD (scalar levels x
        fp16 scale, rotated).
    bits: bits per coordinate of the codes (identity: the storage dtype's bits, or 0 for
        "the model's dtype").
    roles: role -> component name in the pool dict. Roles: "values" (identity), "codes",
        "scales", "biases" (affine), "scales" (lattice/lloyd: one per vector).
    group_size: affine coordinates per scale/bias (0 otherwise).
    rotation_seed: seed of the Hadamard rotation R = H diag(signs) / sqrt(D) the codes
        live behind (mlxkv.codec.rotation), None when not rotated.
    step: lattice scale constant c_{L,m} (s = c * rms(R x)); 0 otherwise.
    levels: Lloyd-Max levels (ascending, unit scale); empty otherwise.
    """

    kind: str
    bits: int
    roles: dict[str, str] = field(hash=False)
    group_size: int = 0
    rotation_seed: int | None = None
    step: float = 0.0
    levels: tuple[float, ...] = ()

    @property
    def rotated(self) -> bool:
        return self.rotation_seed is not None

    def component(self, pool: dict, role: str) -> mx.array:
        """The pool array playing `role` (KeyError when the layout has no such role)."""
        return pool[self.roles[role]]


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

    @property
    def kernel_layout(self) -> KernelLayout:
        """The layout kernels read (see KernelLayout); the only thing dispatchers inspect."""
        ...
