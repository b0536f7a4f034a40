"""The engine over compressed KV blocks: codecs plug into the KVStore; logits stay close."""

from __future__ import annotations

import mlx.core as mx
import pytest
from engine_helpers import make_llm

from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_store import KVStore
from mlxkv.models.adapter import group_specs_for
from mlxkv.models.tiny import make_tiny_model
from mlxkv.runner import ModelRunner
from mlxkv.sampling import SamplingParams

PROMPT = [(5 * i + 1) % 500 + 1 for i in range(29)]


def last_logits(model, spec):
    groups = group_specs_for(model)
    codecs = parse_kv_codec(spec, len(model.layers))
    store = KVStore(groups, [32] * len(groups), 4, mx.float32, codecs)
    cache = KVCacheManager(groups, [32] * len(groups), 4)
    runner = ModelRunner(model, store)
    cache.lookup("a", PROMPT)
    outs = []
    for start, end in ((0, 20), (20, 29)):  # the second chunk reads the first from the pool
        cache.allocate_slots("a", end - start)
        entry = SeqEntry(PROMPT[start:end], start, cache.slot_mapping("a", start, end),
                         cache.block_tables("a"))
        outs.append(runner.forward(build_batch([entry]))[0])
    return outs[-1]


# Exactness against decode-then-attend is tests/engine/test_equivalence.py; this is the
# loss each codec family is allowed on the sharp tiny model (4-bit errors are amplified).
@pytest.mark.parametrize(("spec", "tol"), [("fp32", 1e-5), ("int8", 0.02), ("e8:k4v4", 0.5),
                                           ("lloyd:k4v4", 0.5), ("d4:k4v3", 0.75)])
def test_compressed_store_logits_close_to_full_precision(spec, tol):
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    ref, got = last_logits(model, "auto"), last_logits(model, spec)
    rel = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
    assert rel < tol


def test_smollm2_generates_on_e8_blocks(smollm2):
    llm = make_llm(smollm2, kv_codec="e8:k4v3")
    out = llm.generate(["The capital of France is"],
                       SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert "Paris" in out["text"]
    stats = llm.engine.cache_stats()
    full = make_llm(smollm2).engine.cache_stats()
    # e8 K4/V3 at head_dim 64: 34 + 26 bytes per K/V pair vs 512 in fp32
    assert stats["groups"][0]["bytes_per_block"] * 8 < full["groups"][0]["bytes_per_block"]
