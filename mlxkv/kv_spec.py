"""Layer geometry of a model's KV cache, shared by the control plane and the data plane.

Layers with the same (sliding_window, num_kv_heads, head_dim) form a *group*: one block
pool and one block table per request per group. Block id 0 of every group is the reserved
null block (sliding groups point table entries that fell out of the window at it).
A slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """Layers that share block tables: full attention (window None) or one sliding window."""

    layer_ids: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None


def make_group_specs(
    sliding_windows: list[int | None], num_kv_heads: list[int], head_dims: list[int]
) -> list[KVGroupSpec]:
    """Group layers by (window, kv heads, head dim), in order of first appearance.

    Args:
        sliding_windows: per layer, the window size or None for full attention.
        num_kv_heads: per layer KV head count.
        head_dims: per layer head dim.
    Returns:
        One spec per distinct geometry; every layer id appears in exactly one spec.
    """
    groups: dict[tuple, list[int]] = {}
    for layer_id, key in enumerate(zip(sliding_windows, num_kv_heads, head_dims, strict=True)):
        groups.setdefault(key, []).append(layer_id)
    return [
        KVGroupSpec(tuple(ids), num_kv_heads=kvh, head_dim=hd, sliding_window=win)
        for (win, kvh, hd), ids in groups.items()
    ]
