"""KVStore: the only owner of KV device memory. Per layer and codec component one pool:

    pool[component]  # [num_blocks_g, block_size, num_kv_heads, *trailing]   (g = layer's group)

Writes encode through the layer's codec and scatter into slots (`block_id * block_size +
offset`), or go through a compiled `writer` that encodes straight into the pool (the CPU
primitive, installed by the engine's KernelGuard); reads gather whole blocks through block
tables and decode. Block id 0 is the
null block: never written, only read under a mask. The store never keeps a second
reference to a pool (that would force MLX to copy the whole pool on the next write).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx

from mlxkv.codec.base import KVCodec
from mlxkv.codec.identity import IdentityCodec
from mlxkv.kernels.kv_encode import kv_encode, kv_write
from mlxkv.kv_spec import KVGroupSpec

Pools = dict[str, mx.array]
Encoder = Callable[..., dict[str, mx.array]]
# writer(pools=, codec=, slot_mapping=, x=) -> the updated pool arrays, or None when it does
# not cover the codec / rows (then the store encodes with `encoder` and scatters).
Writer = Callable[..., Pools | None]


class KVStore:
    """Paged K/V pools for every layer, in each layer's codec layout."""

    def __init__(
        self,
        groups: Sequence[KVGroupSpec],
        num_blocks: Sequence[int],
        block_size: int,
        dtype: mx.Dtype,
        codecs: Mapping[int, tuple[KVCodec, KVCodec]] | None = None,
        encoder: Encoder = kv_encode,
    ):
        """`encoder(x=, codec=)` -> packed components: the kv_encode dispatcher (Metal
        kernel for lattice codecs, else codec.encode) unless a test passes another."""
        self.groups = list(groups)
        self.num_blocks = list(num_blocks)
        self.block_size = block_size
        self.dtype = dtype
        self.encoder = encoder
        self.writer: Writer | None = None
        self._group_of: dict[int, int] = {}
        self.codecs: dict[int, tuple[KVCodec, KVCodec]] = {}
        self._pools: dict[int, tuple[Pools, Pools]] = {}
        for gi, spec in enumerate(self.groups):
            for layer_id in spec.layer_ids:
                self._group_of[layer_id] = gi
                pair = (codecs or {}).get(layer_id) or (IdentityCodec(), IdentityCodec())
                self.codecs[layer_id] = pair
                self._pools[layer_id] = tuple(
                    self._make_pools(codec, spec, self.num_blocks[gi]) for codec in pair
                )
        mx.eval([list(k.values()) + list(v.values()) for k, v in self._pools.values()])

    def _make_pools(self, codec: KVCodec, spec: KVGroupSpec, num_blocks: int) -> Pools:
        lead = (num_blocks, self.block_size, spec.num_kv_heads)
        return {
            name: mx.zeros(lead + tuple(trailing), dtype=dt)
            for name, (trailing, dt) in codec.packed_spec(spec.head_dim, self.dtype).items()
        }

    # -- geometry ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._pools)

    def group_of_layer(self, layer_id: int) -> int:
        return self._group_of[layer_id]

    def k_pool(self, layer_id: int) -> Pools:
        return self._pools[layer_id][0]

    def v_pool(self, layer_id: int) -> Pools:
        return self._pools[layer_id][1]

    def bytes_per_block(self, group_id: int) -> int:
        """Bytes one block takes over all layers of the group (K and V, codes and scales)."""
        spec = self.groups[group_id]
        total = 0
        for layer_id in spec.layer_ids:
            for codec in self.codecs[layer_id]:
                total += codec.bytes_per_vector(spec.head_dim, self.dtype)
        return total * self.block_size * spec.num_kv_heads

    def bytes_per_token(self) -> int:
        return sum(self.bytes_per_block(g) for g in range(len(self.groups))) // self.block_size

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes for pair in self._pools.values() for pools in pair for a in pools.values()
        )

    def arrays(self) -> list[mx.array]:
        """Every pool array (to mx.eval after a step's writes)."""
        return [a for pair in self._pools.values() for pools in pair for a in pools.values()]

    # -- writes ---------------------------------------------------------------------------
    def write(self, layer_id: int, slot_mapping: mx.array, k: mx.array, v: mx.array) -> None:
        """Store k, v [T, num_kv_heads, head_dim] at slots [T] (encoded by the layer codec):
        through `writer` when it covers the codec, else `encoder` and a scatter. Both give
        the same pool contents (the compiled writers are bit-identical to codec.encode)."""
        for pools, codec, x in zip(self._pools[layer_id], self.codecs[layer_id], (k, v),
                                   strict=True):
            written = None
            if self.writer is not None:
                written = self.writer(pools=pools, codec=codec, slot_mapping=slot_mapping, x=x)
            if written is None:
                kv_write(pools, codec, slot_mapping, x, encoder=self.encoder)
            else:
                pools.update(written)

    def copy_blocks(self, group_id: int, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> dst for every layer of the group, batched."""
        if not pairs:
            return
        src = mx.array([s for s, _ in pairs], dtype=mx.int32)
        dst = mx.array([d for _, d in pairs], dtype=mx.int32)
        for layer_id in self.groups[group_id].layer_ids:
            for pools in self._pools[layer_id]:
                for name, pool in pools.items():
                    pool[dst] = pool[src]
                    pools[name] = pool

    # -- reads ----------------------------------------------------------------------------
    def gather_blocks(self, layer_id: int, block_ids: mx.array) -> tuple[mx.array, mx.array]:
        """Decoded K, V of blocks `block_ids` [...]: [..., block_size, num_kv_heads, head_dim]."""
        out = []
        for pools, codec in zip(self._pools[layer_id], self.codecs[layer_id], strict=True):
            packed = {name: pool[block_ids] for name, pool in pools.items()}
            out.append(codec.decode(packed, self.dtype))
        return out[0], out[1]

    def gather(self, layer_id: int, block_table: Sequence[int], num_tokens: int):
        """Decoded K, V [num_tokens, num_kv_heads, head_dim] of one sequence (tests, tools)."""
        k, v = self.gather_blocks(layer_id, mx.array(list(block_table), dtype=mx.int32))
        k = k.reshape(-1, *k.shape[2:])[:num_tokens]
        v = v.reshape(-1, *v.shape[2:])[:num_tokens]
        return k, v
