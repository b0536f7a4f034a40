"""Equivalence oracles over per-step logits (shared by tests/engine and tests/mutation).

Each oracle runs the same tokens two ways that must agree (a prefix hit and a cold run,
a preempted and an uninterrupted run, ...) and raises AssertionError when any step's
fp32 logits differ by more than ATOL. Driven by the sharp tiny models
(mlxkv.models.tiny), whose logits move by whole units when attention reads one wrong
key, so a wrong block, slot or mask cannot hide behind unchanged greedy ids.
tests/mutation/ plants such bugs and checks that an oracle fails for each.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.codec.base import KVCodec
from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_store import KVStore
from mlxkv.llm import LLM
from mlxkv.models.adapter import group_specs_for
from mlxkv.runner import ModelRunner
from mlxkv.sampling import SamplingParams

ATOL = 1e-3  # fp32 paths differ by <2e-4 (reduction order); one wrong key moves logits >0.1
PROMPT = [(7 * i + 3) % 500 + 1 for i in range(37)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@dataclass
class Trace:
    """One request's sampled ids and the fp32 logits [steps, vocab] each was drawn from."""

    token_ids: list[int]
    logits: np.ndarray


def llm_for(loaded, num_blocks, block_size, max_batched, max_seqs, linear="auto",
            **cache_kw) -> LLM:
    """An LLM over `loaded` (model, tokenizer) with the given pool and scheduler sizes
    (`linear`: EngineConfig.linear, "reference" to compute like mlx-lm's own matmul)."""
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, **cache_kw),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=max_seqs),
        linear=linear,
    )
    return LLM(config, loaded=loaded)


def make_llm(model, num_blocks=256, block_size=4, max_batched=512, max_seqs=32, **cache_kw):
    """A tokenizer-less LLM over a tiny model: a small pool and 4-token blocks by default."""
    return llm_for((model, None), num_blocks, block_size, max_batched, max_seqs, **cache_kw)


def run(llm: LLM, prompts, params=GREEDY) -> dict[str, Trace]:
    """Run prompts (ids "r0", "r1", ...; forks "r0#1") to the end; traces by request id."""
    engine = llm.engine
    logits: dict[str, list[np.ndarray]] = defaultdict(list)
    ids: dict[str, list[int]] = defaultdict(list)

    def sink(request_ids, rows):
        for rid, row in zip(request_ids, np.array(rows.astype(mx.float32)), strict=True):
            logits[rid].append(row)

    engine.logits_sink = sink
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            key = out.request_id + (f"#{out.index}" if out.index else "")
            ids[key] += out.new_token_ids
            assert out.finish_reason != "error", out.error
    engine.logits_sink = None
    engine.cache.check_invariants()
    assert engine.cache_stats()["blocks_used"] == 0
    return {rid: Trace(ids[rid], np.stack(rows)) for rid, rows in logits.items()}


def assert_same(got: Trace, ref: Trace, what: str, atol: float = ATOL) -> None:
    """Identical ids and per-step logits within atol (the first bad step is reported)."""
    n = min(len(got.logits), len(ref.logits))
    for step in range(n):
        diff = float(np.abs(got.logits[step] - ref.logits[step]).max())
        assert diff <= atol, f"{what}: step {step} logits differ by {diff:.4g} (atol {atol})"
    assert len(got.logits) == len(ref.logits), f"{what}: {len(got.logits)} vs {len(ref.logits)}"
    assert got.token_ids == ref.token_ids, f"{what}: ids {got.token_ids} vs {ref.token_ids}"


def alone(model, prompt, params=GREEDY, **kw) -> Trace:
    """The plain run: one request in a roomy pool, prompt prefilled in one chunk."""
    return run(make_llm(model, **kw), [prompt], params)["r0"]


# -- the oracles ---------------------------------------------------------------------------
def greedy_cache_loop(model, prompt, steps, cache=None) -> Trace:
    """Greedy `steps` tokens from mlx-lm's model over `cache` (default: its own KV cache),
    the whole prompt in one forward; the fp32 logits of every step."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model) if cache is None else cache
    x, rows, ids = mx.array(list(prompt))[None], [], []
    for _ in range(steps):
        row = model(x, cache=cache)[0, -1].astype(mx.float32)
        rows.append(np.array(row))
        ids.append(int(mx.argmax(row)))
        x = mx.array([[ids[-1]]])
    return Trace(ids, np.stack(rows))


def engine_vs_mlx_lm(model, prompt=PROMPT, steps=10, **llm_kw) -> None:
    """The engine's logits equal mlx-lm's own model + KV cache, step by step."""
    got = alone(model, prompt, SamplingParams(max_tokens=steps, temperature=0.0,
                                              ignore_eos=True), **llm_kw)
    assert_same(got, greedy_cache_loop(model, prompt, steps), "engine vs mlx-lm")


def prefix_hit_vs_cold(model) -> None:
    """A request served from another's cached blocks equals the same request cold."""
    other = PROMPT[:25] + [11, 12, 13, 14, 15, 16, 17]
    llm = make_llm(model)
    run(llm, [PROMPT])
    warm = run(llm, [other, PROMPT])
    assert llm.engine.cache.counters["hit_tokens"] >= 24 + 36
    assert_same(warm["r0"], alone(model, other), "prefix hit (shared 24 tokens) vs cold")
    assert_same(warm["r1"], alone(model, PROMPT), "prefix hit (same prompt) vs cold")


def preempted_vs_uninterrupted(model) -> None:
    """Requests preempted (blocks freed, recomputed later) equal uninterrupted ones."""
    prompts = [PROMPT[:30], PROMPT[5:35], PROMPT[2:32]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm = make_llm(model, num_blocks=30, enable_prefix_caching=False)
    got = run(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert_same(got[f"r{i}"], alone(model, p, params), f"preempted r{i}")


def mixed_batch_vs_alone(model) -> None:
    """Chunked prefills mixed with decode rows in one flat batch equal each prompt alone."""
    prompts = [PROMPT[:n] for n in (3, 17, 37, 9)] + [PROMPT[2:19], PROMPT[5:22]]
    got = run(make_llm(model, max_batched=8), prompts)
    for i, p in enumerate(prompts):
        assert_same(got[f"r{i}"], alone(model, p), f"mixed batch r{i} (len {len(p)})")


def chunked_vs_whole(model) -> None:
    """A prompt prefilled 5 tokens at a time equals it prefilled in one chunk."""
    got = run(make_llm(model, max_batched=5), [PROMPT])["r0"]
    assert_same(got, alone(model, PROMPT), "chunked prefill (5) vs whole")


def fork_vs_fresh(model) -> None:
    """n=3 forks (sharing the prompt's blocks, COW on the partial tail) equal fresh runs."""
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=4)
    got = run(make_llm(model), [PROMPT[:30]], params)
    assert len({tuple(t.token_ids) for t in got.values()}) == 3, "forks did not diverge"
    for i, rid in enumerate(("r0", "r0#1", "r0#2")):
        fresh = SamplingParams(max_tokens=8, temperature=1.0, seed=4 + i)
        assert_same(got[rid], alone(model, PROMPT[:30], fresh), f"fork {i} vs fresh")


def trim_vs_never_written(model) -> None:
    """Writing 37 tokens, trimming to 22 and writing 5 more equals writing the 27 directly.

    The continuation starts where the cache manager says the sequence now ends.
    """
    groups = group_specs_for(model)
    store = KVStore(groups, [64] * len(groups), 4, mx.float32)
    cache = KVCacheManager(groups, [64] * len(groups), 4)
    runner = ModelRunner(model, store)

    def forward(rid, ids):
        start = cache.num_tokens(rid)
        runner.copy_blocks(cache.allocate_slots(rid, len(ids)).cow_copies)
        entry = SeqEntry(ids, start, cache.slot_mapping(rid, start, start + len(ids)),
                         cache.block_tables(rid))
        return np.array(runner.forward(build_batch([entry]))[0])

    cache.lookup("a", PROMPT)
    forward("a", PROMPT)
    cache.trim("a", 22)
    tail = [5, 6, 7, 8, 9]
    got = forward("a", tail)
    cache.lookup("b", PROMPT[:22] + tail)
    fresh = forward("b", PROMPT[:22] + tail)
    cache.check_invariants()
    assert_same(Trace([], got[None]), Trace([], fresh[None]), "trim(22)+5 vs fresh 27")


class CodecRoundTripCache(KVCache):
    """mlx-lm's dense KVCache storing every K/V vector as decode(encode(x)).

    The decode-then-attend reference for a compressed pool: mlx-lm attends densely over
    exactly the values the engine's paged store holds for the same codecs.
    """

    def __init__(self, k_codec: KVCodec, v_codec: KVCodec):
        super().__init__()
        self.k_codec, self.v_codec = k_codec, v_codec

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        keys = self.k_codec.decode(self.k_codec.encode(keys), keys.dtype)
        values = self.v_codec.decode(self.v_codec.encode(values), values.dtype)
        return super().update_and_fetch(keys, values)


def codec_vs_decode_then_attend(model, spec: str, atol: float = ATOL) -> None:
    """The engine over `spec` pools equals dense attention over round-tripped K/V."""
    codecs = parse_kv_codec(spec, len(model.layers))
    # 3 chunks read the pool. K/V come from MLX's matmul on both sides: the compiled
    # linear's summation order would move a K value across a code boundary now and then
    # (lloyd:k7v5 at step 0), which is not what this oracle is about.
    got = alone(model, PROMPT, kv_codec=spec, max_batched=16, linear="reference")
    cache = [CodecRoundTripCache(*codecs[i]) for i in range(len(model.layers))]
    ref = greedy_cache_loop(model, PROMPT, len(got.token_ids), cache)
    assert_same(got, ref, f"{spec} engine vs decode-then-attend", atol)


ORACLES = {
    "engine_vs_mlx_lm": engine_vs_mlx_lm,
    "prefix_hit_vs_cold": prefix_hit_vs_cold,
    "preempted_vs_uninterrupted": preempted_vs_uninterrupted,
    "mixed_batch_vs_alone": mixed_batch_vs_alone,
    "chunked_vs_whole": chunked_vs_whole,
    "fork_vs_fresh": fork_vs_fresh,
    "trim_vs_never_written": trim_vs_never_written,
}
