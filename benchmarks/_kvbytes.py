"""Exact KV bytes of a codec allocation: per token, split full / sliding, projected to a context.

Per layer and token: K and V bytes from each codec's `bytes_per_vector` (codes, scales and
every other stored component) times the KV heads. A full-attention layer holds every token;
a sliding layer holds min(context, window) tokens; both in whole blocks of `block_size`.
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlxkv.codec import IdentityCodec
from mlxkv.kv_profile import layer_geometry as geometry  # noqa: F401  (per layer geometry)


def _layer_bytes(geo, codecs, dtype) -> list[int]:
    full = IdentityCodec()
    out = []
    for i, g in enumerate(geo):
        k, v = (full, full) if codecs is None else codecs[i]
        out.append(g["num_kv_heads"] * (k.bytes_per_vector(g["head_dim"], dtype)
                                        + v.bytes_per_vector(g["head_dim"], dtype)))
    return out


def _fp16_bytes(geo) -> list[int]:
    return [g["num_kv_heads"] * g["head_dim"] * 2 * 2 for g in geo]


def split_bytes(geo, codecs, dtype: mx.Dtype) -> dict:
    """Bytes per token over all layers, full-attention layers and sliding layers, and fp16's."""
    per = _layer_bytes(geo, codecs, dtype)
    sliding = [g["sliding_window"] is not None for g in geo]
    return {"bytes_per_token": sum(per),
            "bytes_full_layers": sum(b for b, s in zip(per, sliding, strict=True) if not s),
            "bytes_sliding_layers": sum(b for b, s in zip(per, sliding, strict=True) if s),
            "fp16_bytes_per_token": sum(_fp16_bytes(geo))}


def _held(ctx: int, window: int | None, block_size: int) -> int:
    tokens = ctx if window is None else min(ctx, window)
    return math.ceil(tokens / block_size) * block_size


def projection(geo, codecs, dtype: mx.Dtype, contexts, block_size: int = 16) -> list[dict]:
    """Whole-model KV bytes of one sequence at each context, and the ratio to fp16."""
    per, fp16 = _layer_bytes(geo, codecs, dtype), _fp16_bytes(geo)
    out = []
    for ctx in contexts:
        held = [_held(ctx, g["sliding_window"], block_size) for g in geo]
        total = sum(b * n for b, n in zip(per, held, strict=True))
        base = sum(b * n for b, n in zip(fp16, held, strict=True))
        full = sum(b * n for b, n, g in zip(per, held, geo, strict=True) if g["sliding_window"] is None)
        out.append({"ctx": ctx, "bytes": total, "bytes_full_layers": full,
                    "bytes_sliding_layers": total - full, "fp16_bytes": base,
                    "x_vs_fp16": base / total})
    return out
