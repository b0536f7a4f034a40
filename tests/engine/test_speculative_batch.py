"""Speculating requests under load (no leaks) and the n-gram path on SmolLM2 vs mlx-lm."""

from __future__ import annotations

import random

import numpy as np
from oracles import Trace, assert_same, greedy_cache_loop, llm_for, run
from spec_helpers import spec_llm

from mlxkv.config import SpeculativeConfig
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams
from mlxkv.speculative import Speculator, ngram_propose


def _random_request(rng: random.Random):
    motif = [rng.randrange(1, 500) for _ in range(rng.randint(3, 7))]
    prompt = motif * rng.randint(2, 4) + [rng.randrange(1, 500) for _ in range(rng.randint(1, 9))]
    params = SamplingParams(max_tokens=rng.randint(4, 30), ignore_eos=True,
                            temperature=rng.choice([0.0, 0.0, 0.8]), n=rng.choice([1, 1, 2]))
    return prompt, params


def test_aborts_preemptions_and_rewinds_leak_no_block():
    """Random arrivals and aborts in a pool too small for the batch (preemption), drafts
    that are often wrong (rewinds): after every step the invariants hold and each running
    request's table covers exactly its computed tokens; at the end no block is in use."""
    rng, draft_rng = random.Random(0), random.Random(1)

    def drafter(ids, max_drafts):  # n-gram, else junk: many partial rejections
        drafts = ngram_propose(ids, max_drafts, 1, 3)
        return drafts or [draft_rng.randrange(1, 500) for _ in range(max_drafts)]

    llm = spec_llm(make_tiny_model("llama"), drafter, num_blocks=48, max_batched=24,
                   max_seqs=8)
    engine = llm.engine
    num_added = num_aborted = 0
    while num_added < 30 or engine.has_unfinished():
        if num_added < 30 and rng.random() < 0.4:
            engine.add_request(f"q{num_added}", *_random_request(rng))
            num_added += 1
        live = engine.scheduler.running + list(engine.scheduler.waiting)
        if live and rng.random() < 0.06:
            num_aborted += engine.abort(rng.choice(live).user_id)
        engine.step()
        engine.cache.check_invariants()
        for req in engine.scheduler.running:
            assert engine.cache.num_tokens(req.request_id) == req.num_computed_tokens
    assert engine.cache_stats()["blocks_used"] == 0
    assert engine.scheduler.num_preemptions > 0 and num_aborted > 0
    c = engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"], c


PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at six, carrying a can of "
    "oil and a cloth for the lens. From the gallery he could see the fishing boats turning "
    "home, the gulls settling on the breakwater, and the lights of the harbour town coming "
    "on one window at a time."
)


def test_smollm2_prompt_lookup_greedy_equals_mlx_lm(smollm2):
    """A copy task (the drafts come from the prompt): the speculating engine's tokens and
    the logits of every accepted token equal mlx-lm's own greedy cache loop."""
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    steps = 40
    llm = llm_for(smollm2, None, 16, 512, 32)
    llm.engine.speculator = Speculator(SpeculativeConfig(method="ngram"))  # production path
    got = run(llm, [prompt], SamplingParams(max_tokens=steps, temperature=0.0,
                                            ignore_eos=True))["r0"]
    ref = greedy_cache_loop(smollm2.model, prompt, steps)
    assert_same(got, ref, "speculative SmolLM2 vs mlx-lm", atol=3e-4)
    c = llm.engine.speculator.counters
    assert c["spec_accepted_tokens"] >= steps // 2, c  # it copies: most drafts pass
    assert llm.engine.stats["steps"] < steps // 2
    assert isinstance(got, Trace) and np.isfinite(got.logits).all()
