"""Per-layer, K/V-separate bit allocation for a byte budget, from a sensitivity profile.

A profile (written by `python3 -m mlxkv.cli profile-kv`, see mlxkv/kv_profile.py) holds,
for every layer and for K and V separately, the KL divergence the model's next-token
distribution suffers when only that tensor is coded at a measured rate m (all else full
precision), plus the layer geometry. Between measured rates the KL is interpolated
log-linearly; beyond them it is taken to scale like the codec's MSE, 4^-m (6 dB per bit). The allocator is greedy: start every
tensor at the top rate and repeatedly lower the one whose next step down adds the least
KL per byte saved, until the bytes per token (metadata included) fit the budget. With
KL convex and decreasing in m this is the optimal integer allocation for additive KL.

Profiles are looked up as <mlxkv cache>/profiles/<model>.json, then as the profiles
shipped in mlxkv/codec/profiles/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlxkv.errors import InvalidRequestError

MAX_RATE, MIN_RATE = 8, 2
PACKAGED = Path(__file__).parent / "profiles"


def profile_path(model_name: str | None, explicit: str | None = None) -> Path:
    """The profile file to use; raises InvalidRequestError when none exists."""
    from mlxkv.config import default_cache_dir

    candidates = [Path(explicit)] if explicit else []
    if model_name and not explicit:
        candidates += [default_cache_dir() / "profiles" / f"{model_name}.json",
                       PACKAGED / f"{model_name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise InvalidRequestError(
        f"no KV sensitivity profile for model {model_name!r} (looked in "
        f"{[str(c) for c in candidates]}); create one with `python3 -m mlxkv.cli profile-kv "
        "--model NAME` or pass ,profile=PATH", param="kv_codec")


def kl_at(points: dict[int, float], rate: int) -> float:
    """KL at `rate` from measured {rate: KL}: log-linear between measured rates, 4^-m
    (6 dB per bit) beyond them."""
    lo = [m for m in points if m <= rate]
    hi = [m for m in points if m >= rate]
    if lo and hi:
        a, b = max(lo), min(hi)
        if a == b:
            return max(points[a], 1e-12)
        w = (rate - a) / (b - a)
        return math.exp((1 - w) * math.log(max(points[a], 1e-12))
                        + w * math.log(max(points[b], 1e-12)))
    nearest = max(lo) if lo else min(hi)
    return max(points[nearest], 1e-12) * 4.0 ** (nearest - rate)


def tensor_bytes(head_dim: int, num_kv_heads: int, rate: int) -> int:
    """Bytes per token of one layer's K (or V) at `rate`: codes plus the fp16 scale."""
    return num_kv_heads * (head_dim // 8 * rate + 2)


def held_share(layers: list[dict], ctx: int | None) -> list[float]:
    """Per layer, the share of a `ctx`-token sequence's tokens it holds: 1 for full
    attention, min(ctx, window) / ctx for a sliding-window layer; all 1 when `ctx` is None
    (bytes per token, every layer alike)."""
    if ctx is None:
        return [1.0] * len(layers)
    return [1.0 if g.get("sliding_window") is None else min(ctx, g["sliding_window"]) / ctx
            for g in layers]


def allocate(profile: dict, ratio: float, min_rate: int = MIN_RATE,
             ctx: int | None = None) -> list[tuple[int, int]]:
    """Per layer (k_rate, v_rate) meeting fp16 bytes / ratio at the least predicted KL.

    With `ctx`, bytes are those of one `ctx`-token sequence (each layer weighted by the
    tokens it holds, `held_share`: a sliding layer's bits cost little at long context);
    without, bytes per token with every layer alike. Raises InvalidRequestError when even
    `min_rate` everywhere misses the budget.
    """
    layers = profile["layers"]
    share = held_share(layers, ctx)
    fp16 = sum(2 * 2 * g["head_dim"] * g["num_kv_heads"] * w for g, w in zip(layers, share,
                                                                          strict=True))
    budget = fp16 / ratio
    rates = {(i, kv): MAX_RATE for i in range(len(layers)) for kv in ("k", "v")}
    kl = {key: {int(m): v for m, v in profile["kl"][key[1]][key[0]].items()} for key in rates}

    def size(key, m):
        g = layers[key[0]]
        return tensor_bytes(g["head_dim"], g["num_kv_heads"], m) * share[key[0]]

    total = sum(size(key, m) for key, m in rates.items())
    while total > budget:
        options = [((kl_at(kl[key], m - 1) - kl_at(kl[key], m))
                    / (size(key, m) - size(key, m - 1)), key)
                   for key, m in rates.items() if m > min_rate]
        if not options:
            raise InvalidRequestError(f"auto:{ratio}x is beyond {min_rate} bits everywhere",
                                      param="kv_codec")
        _, key = min(options)
        total -= size(key, rates[key]) - size(key, rates[key] - 1)
        rates[key] -= 1
    return [(rates[(i, "k")], rates[(i, "v")]) for i in range(len(layers))]


def predicted_kl(profile: dict, per_layer: list[tuple[int, int]]) -> float:
    """Sum of the per-tensor KL predictions of an allocation (the allocator's objective)."""
    total = 0.0
    for i, (k, v) in enumerate(per_layer):
        for kv, m in (("k", k), ("v", v)):
            total += kl_at({int(r): x for r, x in profile["kl"][kv][i].items()}, m)
    return total


def allocate_from_profile(ratio: float, num_layers: int, model_name: str | None,
                          path: str | None = None, family: str | None = None,
                          ctx: int | None = None) -> list[str]:
    """Per layer head specs (e.g. "e8:k6v5") for `auto:<ratio>x`.

    `family` overrides the profile's codec family: the rates stay those chosen from the
    profile (every family's error falls by the same ~6 dB per bit, so the ranking of
    tensors, which is what the allocation uses, carries over). `ctx` budgets the bytes of
    one `ctx`-token sequence instead of bytes per token (see `allocate`).
    """
    if not math.isfinite(ratio) or ratio < 1.0:
        raise InvalidRequestError(f"auto:{ratio}x: the ratio must be >= 1", param="kv_codec")
    profile = json.loads(profile_path(model_name, path).read_text())
    if len(profile["layers"]) != num_layers:
        raise InvalidRequestError(f"profile has {len(profile['layers'])} layers, the model "
                                  f"{num_layers}", param="kv_codec")
    family = family or profile.get("family", "e8")
    return [f"{family}:k{k}v{v}" for k, v in allocate(profile, ratio, ctx=ctx)]
