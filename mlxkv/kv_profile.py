"""KV sensitivity profiles: how much each layer's K and V tolerate compression.

`profile_model` codes one tensor at a time (layer i's K, or its V) at each profiled rate,
everything else at full precision, runs teacher-forced prefill windows of a calibration
text through the paged data plane, and records the KL divergence of the next-token
distributions from the uncompressed run. `mlxkv.codec.allocate` turns the profile into
per-layer rates for a byte budget (`--kv-codec auto:3.0x`).

    python3 -m mlxkv.cli profile-kv --model smollm2-135m-instruct --text calib.txt
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlx.core as mx

from mlxkv.codec import IdentityCodec, get_codec
from mlxkv.codec.roundtrip import round_trip_layers

log = logging.getLogger(__name__)
TOP_K = 64


def prefill_logits(model, layer_codecs, windows: list[list[int]], block_size: int = 16):
    """fp32 logits [num_windows, ctx - ctx // 2, vocab] of the second halves of teacher-forced
    prefill windows through the paged store with `layer_codecs` ({layer: (k_codec,
    v_codec)} or None), lazily evaluated. Only the second halves are scored: positions
    with a long context, and half the LM-head work."""
    from mlxkv.cache_manager import KVCacheManager
    from mlxkv.inputs import SeqEntry, build_batch
    from mlxkv.kv_store import KVStore
    from mlxkv.models.adapter import group_specs_for
    from mlxkv.runner import ModelRunner

    groups = group_specs_for(model)
    ctx = len(windows[0])
    blocks = [len(windows) * (ctx // block_size + 2) + 1] * len(groups)
    store = KVStore(groups, blocks, block_size, mx.float32, layer_codecs)
    cache = KVCacheManager(groups, blocks, block_size, enable_prefix_caching=False)
    entries = []
    for i, w in enumerate(windows):
        cache.lookup(str(i), w)
        cache.allocate_slots(str(i), ctx)
        entries.append(SeqEntry(w, 0, cache.slot_mapping(str(i), 0, ctx),
                                cache.block_tables(str(i))))
    batch = build_batch(entries)
    rows = [i * ctx + p for i in range(len(windows)) for p in range(ctx // 2, ctx)]
    batch = dataclasses.replace(batch, logits_indices=mx.array(rows, dtype=mx.int32))
    logits = ModelRunner(model, store).forward(batch)
    return logits.reshape(len(windows), len(rows) // len(windows), -1)


@dataclasses.dataclass(slots=True)
class TopKReference:
    """The reference distribution kept as its top-k log-probs plus the tail mass: KL against
    it is the KL of the distributions coarsened to (top-k tokens, everything else), a lower
    bound on the full KL that is tight when the tail mass is small."""

    ids: mx.array  # [..., k] int32
    logp: mx.array  # [..., k]
    tail: mx.array  # [...] log of the tail mass

    @classmethod
    def of(cls, logits: mx.array, k: int = TOP_K) -> TopKReference:
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ids = mx.argpartition(-logp, k, axis=-1)[..., :k]
        top = mx.take_along_axis(logp, ids, axis=-1)
        tail = mx.log(mx.maximum(1 - mx.sum(mx.exp(top), axis=-1), 1e-30))
        mx.eval(ids, top, tail)
        return cls(ids, top, tail)

    def kl(self, logits: mx.array) -> mx.array:
        """Per-position KL(reference || logits') [...] over the coarsened distributions."""
        logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        top = mx.take_along_axis(logq, self.ids, axis=-1)
        tail_q = mx.log(mx.maximum(1 - mx.sum(mx.exp(top), axis=-1), 1e-30))
        kl = mx.sum(mx.exp(self.logp) * (self.logp - top), axis=-1)
        return kl + mx.exp(self.tail) * (self.tail - tail_q)


def calibration_windows(tokenizer, text: str, ctx: int, num: int) -> list[list[int]]:
    """`num` consecutive windows of `ctx` tokens (BOS-led when the tokenizer adds BOS)."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:
        ids = ids[1:]
        windows = [[bos] + ids[i * (ctx - 1): (i + 1) * (ctx - 1)] for i in range(num)]
    else:
        windows = [ids[i * ctx: (i + 1) * ctx] for i in range(num)]
    if len(windows[-1]) < ctx:
        raise ValueError(f"calibration text too short for {num} windows of {ctx} tokens")
    return windows


def layer_geometry(model) -> list[dict]:
    from mlxkv.models.adapter import group_specs_for

    geo = {}
    for g in group_specs_for(model):
        for i in g.layer_ids:
            geo[i] = {"head_dim": g.head_dim, "num_kv_heads": g.num_kv_heads,
                      "sliding_window": g.sliding_window}
    return [geo[i] for i in sorted(geo)]


def profile_model(model, windows: list[list[int]], rates=(4, 5), family: str = "e8",
                  seed: int = 0) -> dict:
    """{"layers": geometry, "kl": {"k"|"v": [per layer {rate: KL}]}, ...} (see module doc)."""
    layers = layer_geometry(model)
    ref = TopKReference.of(prefill_logits(model, None, windows))
    full = IdentityCodec()
    kl = {"k": [{} for _ in layers], "v": [{} for _ in layers]}
    for rate in rates:
        for i in range(len(layers)):
            for kv in ("k", "v"):
                codec = get_codec(f"{family}m{rate}", seed if kv == "k" else seed + 1)
                codecs = {j: (full, full) for j in range(len(layers))}
                codecs[i] = (codec, full) if kv == "k" else (full, codec)
                logits = prefill_logits(model, round_trip_layers(codecs), windows)
                kl[kv][i][str(rate)] = mx.mean(ref.kl(logits)).item()
            log.info("rate %d layer %d: KL k %.2e v %.2e", rate, i, kl["k"][i][str(rate)],
                     kl["v"][i][str(rate)])
    return {"family": family, "rates": list(rates), "seed": seed, "layers": layers, "kl": kl,
            "calibration": {"windows": len(windows), "ctx": len(windows[0]),
                            "metric": f"mean KL over teacher-forced positions, top-{TOP_K} + tail"}}


def write_profile(profile: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return path
