"""Build an LLMEngine from an EngineConfig: model -> KV groups -> codecs -> pool size -> parts.

With `--speculative draft` the draft model is loaded (or shares the target's weights, cut
to its first `draft_layers` layers), checked to share the target's vocabulary, and given
its own pool: the KV budget is split between the two pools in proportion to their bytes
per token, so both hold about as many tokens.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxkv.cache_manager import KVCacheManager
from mlxkv.config import EngineConfig
from mlxkv.errors import ModelLoadError
from mlxkv.kv_store import KVStore
from mlxkv.memory import device_budget, plan_num_blocks
from mlxkv.models.adapter import group_specs_for, truncated


def _codecs(spec: str, num_layers: int, model_name: str | None = None):
    if spec in ("auto", "identity"):
        return None
    from mlxkv.codec import parse_kv_codec

    return parse_kv_codec(spec, num_layers, model_name)


def _bytes_per_block(groups, codecs, block_size: int, dtype) -> list[int]:
    from mlxkv.codec.identity import IdentityCodec

    out = []
    for g in groups:
        total = 0
        for layer_id in g.layer_ids:
            pair = (codecs or {}).get(layer_id) or (IdentityCodec(), IdentityCodec())
            total += sum(c.bytes_per_vector(g.head_dim, dtype) for c in pair)
        out.append(total * block_size * g.num_kv_heads)
    return out


def _unpack(loaded):
    return (loaded.model, loaded.tokenizer) if hasattr(loaded, "model") else loaded


def build_engine(cls, config: EngineConfig, loaded=None, draft=None):
    """Assemble the engine; `loaded` (a LoadedModel or (model, tokenizer)) skips loading,
    and so does `draft` for the draft model of `--speculative draft`."""
    if loaded is None:
        from mlxkv.models.loader import load_model

        m = config.model
        loaded = load_model(m.model, dtype=m.dtype, cache_dir=m.cache_dir)
    model, tokenizer = _unpack(loaded)
    draft_model = (load_draft(config, loaded, draft) if config.speculative.method == "draft"
                   else None)
    name = getattr(loaded, "name", None)
    pools = _plan_pools(config, [(model, _codecs(config.cache.kv_codec, len(model.layers), name))]
                        + ([(draft_model, None)] if draft_model is not None else []))
    (groups, num_blocks, store), *draft_pool = pools
    salt = f"{name or ''}:{config.cache.kv_codec}".encode()
    cache = KVCacheManager(groups, num_blocks, config.cache.block_size,
                           enable_prefix_caching=config.cache.enable_prefix_caching,
                           hash_salt=salt)
    engine = cls(model, tokenizer, store, cache, config, _max_len(model, config, groups,
                                                                  num_blocks))
    engine.model_name = config.model.served_model_name or getattr(loaded, "name", "model")
    if draft_model is not None:
        engine.attach_draft(_make_draft(config, model, draft_model, *draft_pool[0]))
    return engine


def _plan_pools(config: EngineConfig, models) -> list[tuple]:
    """Per (model, codecs): (groups, blocks per group, KVStore); one budget split by bytes
    per token (or `num_blocks` each)."""
    bs = config.cache.block_size
    shapes = []
    for model, codecs in models:
        groups = group_specs_for(model)
        dtype = model.model.embed_tokens.weight.dtype
        shapes.append((groups, codecs, dtype, _bytes_per_block(groups, codecs, bs, dtype)))
    per_token = [sum(bpb) for *_, bpb in shapes]
    out = []
    for (groups, codecs, dtype, bpb), share in zip(shapes, per_token, strict=True):
        if config.cache.num_blocks:
            num_blocks = [config.cache.num_blocks] * len(groups)
        else:
            sched = config.scheduler
            budget = device_budget(config.cache) * share // sum(per_token)
            num_blocks = plan_num_blocks(groups, bs, bpb, budget,
                                         max_num_seqs=sched.max_num_seqs,
                                         max_chunk_tokens=sched.max_num_batched_tokens)
        store = KVStore(groups, num_blocks, bs, dtype, codecs)
        mx.eval(store.arrays())
        out.append((groups, num_blocks, store))
    return out


def _max_len(model, config: EngineConfig, groups, num_blocks) -> int:
    args = getattr(model, "args", None)
    model_len = getattr(args, "max_position_embeddings", None) or 1 << 20
    bs = config.cache.block_size
    full = [n for n, g in zip(num_blocks, groups, strict=True) if g.sliding_window is None]
    pool_len = min((n - 1) * bs for n in full) if full else model_len
    return min(model_len, pool_len, config.scheduler.max_model_len or model_len)


# -- the draft model (--speculative draft) ---------------------------------------------------
def load_draft(config: EngineConfig, loaded, draft=None):
    """The draft model: `draft` if given, else `draft_model` loaded (the target's own
    weights when it names the target), cut to `draft_layers`.

    Raises:
        ModelLoadError: the draft's vocabulary differs from the target's, or it cannot be
            cut to `draft_layers`.
    """
    spec = config.speculative
    target, target_tok = _unpack(loaded)
    if draft is None:
        draft = _load_draft_model(config, loaded)
    model, tokenizer = _unpack(draft)
    _check_same_vocab(target, target_tok, model, tokenizer, spec.draft_model)
    if spec.draft_layers is not None:
        try:
            model = truncated(model, spec.draft_layers)
        except ValueError as exc:
            raise ModelLoadError(f"draft model {spec.draft_model!r}: {exc}") from exc
    return model


def _load_draft_model(config: EngineConfig, loaded):
    """The draft named by the config; its tokenizer is checked before its weights load."""
    from mlx_lm.utils import load_tokenizer

    from mlxkv.models.loader import load_model, resolve_model_dir

    m, spec = config.model, config.speculative
    draft_dir = resolve_model_dir(spec.draft_model, cache_dir=m.cache_dir, progress=False)
    target_dir = getattr(loaded, "model_dir", None)
    if target_dir is not None and Path(draft_dir).resolve() == Path(target_dir).resolve():
        return loaded  # drafting with (a cut of) itself: share the weights
    target, target_tok = _unpack(loaded)
    if target_tok is not None:  # refuse another vocabulary without loading its weights
        _check_same_vocab(target, target_tok, None, load_tokenizer(draft_dir),
                          spec.draft_model)
    return load_model(str(draft_dir), dtype=m.dtype, cache_dir=m.cache_dir)


def _check_same_vocab(target, target_tok, draft, draft_tok, name) -> None:
    """Raise ModelLoadError unless the draft (None: not loaded yet) has the target's
    embedding rows and, when both have tokenizers, the same vocabulary."""
    vocabs = [t.get_vocab() if hasattr(t, "get_vocab") else None for t in (target_tok, draft_tok)]
    sizes = [len(v) if v is not None else None for v in vocabs]
    if draft is not None:
        sizes = [int(m.model.embed_tokens.weight.shape[0]) for m in (target, draft)]
    if sizes[0] != sizes[1] or (None not in vocabs and vocabs[0] != vocabs[1]):
        detail = f"{sizes[1]} vs {sizes[0]} token ids" if sizes[0] != sizes[1] else \
            "different vocabularies"
        raise ModelLoadError(f"draft model {name!r} does not share the target's tokenizer "
                             f"({detail}): a draft must propose the target's token ids")


def _num_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _make_draft(config: EngineConfig, target, draft_model, groups, num_blocks, store):
    from mlxkv.draft_model import DraftModel
    from mlxkv.runner import ModelRunner

    cache = KVCacheManager(groups, num_blocks, config.cache.block_size,
                           enable_prefix_caching=False)
    cost = config.speculative.draft_cost
    if cost is None:  # a step streams the weights once (or computes with each once)
        cost = _num_params(draft_model) / _num_params(target)
    return DraftModel(ModelRunner(draft_model, store), cache,
                      config.scheduler.max_num_batched_tokens, cost)
