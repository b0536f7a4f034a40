"""Build an LLMEngine from an EngineConfig: model -> KV groups -> codecs -> pool size -> parts."""

from __future__ import annotations

import mlx.core as mx

from mlxkv.cache_manager import KVCacheManager
from mlxkv.config import EngineConfig
from mlxkv.kv_store import KVStore
from mlxkv.memory import device_budget, plan_num_blocks
from mlxkv.models.adapter import group_specs_for


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


def build_engine(cls, config: EngineConfig, loaded=None):
    """Assemble the engine; `loaded` (a LoadedModel or (model, tokenizer)) skips loading."""
    if loaded is None:
        from mlxkv.models.loader import load_model

        m = config.model
        loaded = load_model(m.model, dtype=m.dtype, cache_dir=m.cache_dir)
    model, tokenizer = (loaded.model, loaded.tokenizer) if hasattr(loaded, "model") else loaded
    groups = group_specs_for(model)
    dtype = model.model.embed_tokens.weight.dtype
    codecs = _codecs(config.cache.kv_codec, len(model.layers), getattr(loaded, "name", None))
    bs = config.cache.block_size
    bpb = _bytes_per_block(groups, codecs, bs, dtype)
    sched = config.scheduler
    if config.cache.num_blocks:
        num_blocks = [config.cache.num_blocks] * len(groups)
    else:
        num_blocks = plan_num_blocks(groups, bs, bpb, device_budget(config.cache),
                                     max_num_seqs=sched.max_num_seqs,
                                     max_chunk_tokens=sched.max_num_batched_tokens)
    store = KVStore(groups, num_blocks, bs, dtype, codecs)
    salt = f"{getattr(loaded, 'name', '')}:{config.cache.kv_codec}".encode()
    cache = KVCacheManager(groups, num_blocks, bs,
                           enable_prefix_caching=config.cache.enable_prefix_caching,
                           hash_salt=salt)
    args = getattr(model, "args", None)
    model_len = getattr(args, "max_position_embeddings", None) or 1 << 20
    pool_len = min((n - 1) * bs for n, g in zip(num_blocks, groups, strict=True)
                   if g.sliding_window is None) if any(
        g.sliding_window is None for g in groups) else model_len
    max_len = min(model_len, pool_len, sched.max_model_len or model_len)
    engine = cls(model, tokenizer, store, cache, config, max_len)
    engine.model_name = config.model.served_model_name or getattr(loaded, "name", "model")
    mx.eval(store.arrays())
    return engine
