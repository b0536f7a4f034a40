"""The one seam between mlx-lm model classes (run unchanged) and mlxkv's paged store.

A step's flat tokens are fed as a batch of T rows of length 1 (`[T, 1]`), so norms and
MLPs run per token and RoPE takes a per-row offset (the token positions). Each layer gets a
`PagedLayerCache`: `update_and_fetch` writes the step's K/V into the store at the batch's
slots, and mlx-lm's `scaled_dot_product_attention` (patched in every mlx_lm.models module
that imports it) computes paged attention over the store when handed such a cache, and
defers to the original otherwise. Architectures that compute attention themselves
(gemma2's soft-capping, listed in SELF_ATTENTION) get a padded fallback instead: each
token row receives its sequence's gathered K/V and a position mask (correct, but it costs
T x context memory, so it is only used where the SDPA seam cannot be).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx

from mlxkv.attention import DecodeOp, gather_context, paged_attention
from mlxkv.inputs import BatchInputs
from mlxkv.kv_spec import KVGroupSpec, make_group_specs
from mlxkv.kv_store import KVStore

UNSUPPORTED: dict[str, str] = {}
SELF_ATTENTION = {"gemma2"}  # compute attention scores themselves, outside the SDPA seam


@dataclass
class PagedLayerCache:
    """Per-layer cache object mlx-lm's attention sees during one paged forward."""

    layer_id: int
    store: KVStore
    batch: BatchInputs
    sliding_window: int | None
    fallback_repeats: int | None = None  # set for SELF_ATTENTION models: GQA repeats
    decode_op: DecodeOp | None = None  # fused decode kernels (None: reference attention)

    @property
    def offset(self) -> mx.array:
        return self.batch.positions

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys/values [T, kvh, 1, D]: write them at the batch's slots; return them as is."""
        group = self.store.group_of_layer(self.layer_id)
        self.store.write(self.layer_id, self.batch.slot_mapping[group], keys[:, :, 0],
                         values[:, :, 0])
        if self.fallback_repeats is None:
            return keys, values
        return self._gather_rows()

    def _row_tables(self, group: int) -> mx.array:
        starts = self.batch.query_start_loc
        seq_of_token = [i for i in range(self.batch.num_seqs) for _ in range(starts[i], starts[i + 1])]
        return self.batch.block_tables[group][mx.array(seq_of_token, dtype=mx.int32)]

    def _gather_rows(self):
        group = self.store.group_of_layer(self.layer_id)  # -> [T, kvh, L, D]
        return gather_context(self.store, self.layer_id, self._row_tables(group))

    def make_mask(self, *args, **kwargs):
        """None on the SDPA path (mlxkv.attention masks by position); a row mask otherwise."""
        if self.fallback_repeats is None:
            return None
        group = self.store.group_of_layer(self.layer_id)
        length = self.batch.block_tables[group].shape[1] * self.store.block_size
        mask = mx.arange(length) <= self.batch.positions[:, None]
        if self.sliding_window is not None:
            mask = mask & (mx.arange(length) > self.batch.positions[:, None] - self.sliding_window)
        extra = (1, 1, 1) if self.fallback_repeats > 1 else (1, 1)
        return mask.reshape(mask.shape[0], *extra, length)

    def __bool__(self) -> bool:
        return True


def _make_paged_sdpa(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if not isinstance(cache, PagedLayerCache):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                            sinks=sinks)
        if sinks is not None:
            raise NotImplementedError("attention sinks are not supported by the paged path")
        out = paged_attention(queries[:, :, 0], cache.store, cache.layer_id, cache.batch,
                              scale, cache.sliding_window, cache.decode_op)
        return out[:, :, None]

    scaled_dot_product_attention._mlxkv_original = original
    return scaled_dot_product_attention


def install_seam() -> None:
    """Route `scaled_dot_product_attention` of every loaded mlx_lm.models module (idempotent)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or module is None:
            continue
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is not None and not hasattr(fn, "_mlxkv_original"):
            module.scaled_dot_product_attention = _make_paged_sdpa(fn)


def model_type(model) -> str:
    args = getattr(model, "args", None)
    return getattr(args, "model_type", type(model).__module__.rsplit(".", 1)[-1])


def check_supported(model) -> None:
    kind = model_type(model)
    if kind in UNSUPPORTED:
        raise NotImplementedError(f"{kind} is not supported by the paged engine: {UNSUPPORTED[kind]}")


def layer_windows(model) -> list[int | None]:
    """Per layer sliding window, as mlx-lm's own make_cache decides it."""
    from mlx_lm.models.cache import RotatingKVCache

    if hasattr(model, "make_cache"):
        return [c.max_size if isinstance(c, RotatingKVCache) else None for c in model.make_cache()]
    return [None] * len(model.layers)


def group_specs_for(model) -> list[KVGroupSpec]:
    """KV groups of an mlx-lm model: layers sharing (window, kv heads, head dim)."""
    heads, dims = [], []
    for layer in model.layers:
        attn = layer.self_attn
        kvh = getattr(attn, "n_kv_heads", None) or attn.num_key_value_heads
        heads.append(int(kvh))
        dims.append(int(getattr(attn, "head_dim", attn.k_proj.weight.shape[0] // kvh)))
    return make_group_specs(layer_windows(model), heads, dims)


def truncated(model, num_layers: int):
    """The model's first num_layers layers, then its final norm and LM head (an early-exit
    draft). A shallow copy: it shares every weight array with `model`, which is unchanged.

    Raises:
        ValueError: num_layers outside 1..len(model.layers), or an architecture whose
            layer list cannot be cut (its caches would not match its layers).
    """
    import copy

    total = len(model.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"--draft-layers must be in 1..{total} (the draft has {total} layers)")
    if num_layers == total:
        return model
    draft = copy.copy(model)
    draft.model = copy.copy(model.model)
    draft.model.layers = model.model.layers[:num_layers]
    if len(layer_windows(draft)) != num_layers:
        raise ValueError(f"{model_type(model)} models cannot be cut to their first layers")
    return draft


def _lm_head(model, hidden: mx.array) -> mx.array:
    args = getattr(model, "args", None)
    tied = getattr(model, "tie_word_embeddings", getattr(args, "tie_word_embeddings", False))
    if tied or not hasattr(model, "lm_head"):
        logits = model.model.embed_tokens.as_linear(hidden)
    else:
        logits = model.lm_head(hidden)
    cap = getattr(args, "final_logit_softcapping", None)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def paged_forward(model, store: KVStore, batch: BatchInputs, windows,
                  decode_op: DecodeOp | None = None) -> mx.array:
    """Run the model on the batch over the store -> fp32 logits [S, vocab] (sampled rows)."""
    return logits_of(model, paged_hidden(model, store, batch, windows, decode_op))


def logits_of(model, hidden: mx.array) -> mx.array:
    """fp32 logits [S, vocab] of final hidden states [S, hidden_size] (lazy)."""
    return _lm_head(model, hidden).astype(mx.float32)


def paged_hidden(model, store: KVStore, batch: BatchInputs, windows,
                 decode_op: DecodeOp | None = None) -> mx.array:
    """Final hidden states [S, hidden_size] of the batch's sampled rows (lazy): callers that
    score many rows apply `logits_of` to slices, bounding the [rows, vocab] memory."""
    repeats = None
    if model_type(model) in SELF_ATTENTION:
        attn = model.layers[0].self_attn
        repeats = attn.n_heads // attn.n_kv_heads
    caches = [PagedLayerCache(i, store, batch, w, repeats, decode_op)
              for i, w in enumerate(windows)]
    hidden = model.model(batch.input_ids[:, None], cache=caches)  # [T, 1, hidden]
    return hidden[batch.logits_indices, 0]
