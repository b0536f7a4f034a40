"""How many KV blocks each layer group gets: a byte budget split by layer geometry.

The budget is `CacheConfig.num_blocks` when given, else `memory_budget_bytes`, else on
Metal `memory_fraction` of the device's recommended working set, else a fixed CPU default.
Sliding-window groups only ever need the window's blocks per sequence, so they get
`max_num_seqs` windows' worth (capped by the budget share) and full-attention groups
get the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlxkv.config import CacheConfig
from mlxkv.kv_spec import KVGroupSpec


def device_budget(cache_config: CacheConfig) -> int:
    """Bytes the KV pool may take on the current device."""
    if cache_config.memory_budget_bytes:
        return cache_config.memory_budget_bytes
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        try:
            info = mx.device_info()
            total = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if total:
                return int(total * cache_config.memory_fraction)
        except Exception:  # no device_info on this backend
            pass
    return cache_config.cpu_default_budget_bytes


def plan_num_blocks(
    groups: Sequence[KVGroupSpec],
    block_size: int,
    bytes_per_block: Sequence[int],
    budget_bytes: int,
    *,
    max_num_seqs: int = 32,
    max_chunk_tokens: int = 512,
) -> list[int]:
    """Blocks per group (including the null block 0) that fit in budget_bytes.

    Args:
        bytes_per_block: per group, bytes one block takes over all of the group's layers.
    Returns:
        One count >= 2 per group.
    """
    counts = [0] * len(groups)
    remaining = budget_bytes
    full = [i for i, g in enumerate(groups) if g.sliding_window is None]
    for i, g in enumerate(groups):
        if g.sliding_window is None:
            continue
        per_seq = -(-(g.sliding_window - 1 + max_chunk_tokens) // block_size) + 1
        want = per_seq * max_num_seqs + 1
        share = budget_bytes // len(groups) if full else budget_bytes // max(1, len(groups))
        counts[i] = max(2, min(want, share // bytes_per_block[i]))
        remaining -= counts[i] * bytes_per_block[i]
    if full:
        per_block = sum(bytes_per_block[i] for i in full)
        num = max(2, remaining // per_block)
        for i in full:
            counts[i] = int(num)
    return counts
