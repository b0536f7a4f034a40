"""Real-model parity at length (issue #13): the paged engine vs mlx-lm, fp32 on CPU.

Greedy ids must be identical and, per step, the chosen token's logprob and the top-k
logprobs must agree with mlx-lm's log-softmax within a tight tolerance:

- SmolLM2-135M: 5 prompts x 128 tokens in a mixed batch (chunked prefill beside decode
  rows) with shared-prefix cache hits, and again through preemption by recompute;
- Gemma-3-270M: 3 prompts x 64 tokens across its 512-token sliding window;
- SmolLM2 with the int8 pool vs mlx-lm attending densely over decode(encode(K/V)), on the
  CPU reference path (measured: identical to the last bit).

Each mlx-lm reference is computed once per module.
"""

from __future__ import annotations

import random

import pytest
from engine_helpers import make_llm
from long_helpers import (
    assert_matches,
    cache_loop_reference,
    greedy_params,
    mlx_lm_reference,
    record_step_kinds,
)
from oracles import CodecRoundTripCache

from mlxkv.codec import parse_kv_codec

pytestmark = pytest.mark.slow  # ~4 minutes on 2 CPU cores: mostly the mlx-lm references

NUM_TOP = 8
SMOL_TOKENS = 128
GEMMA_TOKENS = 64
INT8_TOKENS = 64
TOL = 3e-4  # fp32; measured max 8e-5 (different matmul shapes reorder sums, nothing more)

SHOP_RULES = (
    "You are the assistant of Hilltop Cycles, a small bicycle shop. Facts you may use: "
    "the shop opens at 9 am and closes at 6 pm from Tuesday to Saturday; it is closed on "
    "Sundays and Mondays because the two mechanics race in the regional league on "
    "weekends. Repairs are quoted before any work starts. A flat tyre costs 12 euros, a "
    "brake adjustment 18 euros and a full service 65 euros. Bikes bought here may be "
    "returned within 30 days with the receipt, unridden and with all accessories. Rental "
    "bikes must be back by 5 pm, and late returns cost 5 euros per hour. Answer politely."
)

SMOL_CHATS = [
    [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds "
                                 "a message in a bottle."}],
    None,  # plain-text continuation, see SMOL_TEXT
    [{"role": "system", "content": SHOP_RULES},
     {"role": "user", "content": "Which days is the shop closed, and why?"}],
    [{"role": "system", "content": SHOP_RULES},
     {"role": "user", "content": "I bought a bike last week. Can I still return it?"}],
    [{"role": "user", "content": "I have eggs, spinach, an onion and some cheese."},
     {"role": "assistant", "content": "You could make a spinach and cheese omelette."},
     {"role": "user", "content": "Good idea. Explain the steps, and how to keep the "
                                 "omelette soft in the middle."}],
]
SMOL_TEXT = (
    "The first bicycles had no pedals at all. Riders sat on a wooden frame between two "
    "wheels and pushed themselves along with their feet, which is why the machine was "
    "called a running machine. Pedals attached to the front wheel came decades later, and"
)


def smol_prompts(tokenizer) -> list[list[int]]:
    return [list(tokenizer.encode(SMOL_TEXT)) if chat is None else
            list(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
            for chat in SMOL_CHATS]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def travel_log(seed: int, num_tokens: int, tokenizer) -> list[int]:
    """A deterministic travel diary cut to `num_tokens` tokens: names and places recur."""
    rng = random.Random(seed)
    names = ["Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta"]
    cities = ["Lisbon", "Porto", "Seville", "Lyon", "Turin", "Graz", "Krakow", "Riga"]
    goods = ["maps", "lanterns", "jars of honey", "woollen scarves", "notebooks", "apples"]
    modes = ["train", "bus", "ferry", "bicycle", "night coach"]
    text = "A travel diary kept by a group of friends, one line per day.\n"
    day = 1
    while len(tokenizer.encode(text)) < num_tokens + 8:
        name, a, b = rng.choice(names), *rng.sample(cities, 2)
        text += (f"Day {day}: {name} went from {a} to {b} by {rng.choice(modes)}, carrying "
                 f"{rng.randint(2, 9)} {rng.choice(goods)}.\n")
        day += 1
    return list(tokenizer.encode(text))[:num_tokens]


# -- SmolLM2 -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2):
    """(loaded model, prompts, mlx-lm references for SMOL_TOKENS greedy tokens)."""
    prompts = smol_prompts(smollm2.tokenizer)
    refs = [mlx_lm_reference(smollm2.model, p, SMOL_TOKENS) for p in prompts]
    return smollm2, prompts, refs


def test_smollm2_mixed_batch_with_prefix_hits_matches_mlx_lm(smol):
    """All prompts at once with a 48-token budget: prefill chunks run beside decode rows.

    Prompt 2 runs first, so prompts 2 and 3 (same long system message) start on a
    prefix-cache hit.
    """
    loaded, prompts, refs = smol
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    llm = make_llm(loaded, max_batched=48)
    first = llm.generate([prompts[2]], greedy_params(4, NUM_TOP))[0]
    assert first["token_ids"] == refs[2].token_ids[:4] and first["num_cached_tokens"] == 0
    kinds = record_step_kinds(llm.engine.scheduler)
    outs = llm.generate(prompts, greedy_params(SMOL_TOKENS, NUM_TOP))
    assert any(num_decode and num_prefill for num_decode, num_prefill in kinds)
    # prompt 4 shares the chat template's default system message with prompt 0
    hits = [0, 0, (len(prompts[2]) - 1) // 16 * 16, common_prefix(prompts[2], prompts[3]),
            common_prefix(prompts[0], prompts[4])]
    assert [o["num_cached_tokens"] for o in outs] == [n // 16 * 16 for n in hits]
    assert hits[3] >= 128
    assert_matches(outs, refs, NUM_TOP, TOL)


def test_smollm2_preempted_batch_matches_mlx_lm(smol):
    """64 blocks hold the prompts (35 blocks) but not all 640 tokens more (75 blocks): the
    last admitted request is preempted mid-decode and recomputed once the others finish."""
    loaded, prompts, refs = smol
    llm = make_llm(loaded, num_blocks=64)
    outs = llm.generate(prompts, greedy_params(SMOL_TOKENS, NUM_TOP))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches(outs, refs, NUM_TOP, TOL)
    llm.engine.cache.check_invariants()


# -- Gemma-3: across the sliding window ---------------------------------------------------
GEMMA_PROMPT_TOKENS = (470, 505, 590)  # window 512: decode crosses it, or prefill already did


@pytest.fixture(scope="module")
def gemma(gemma3):
    prompts = [travel_log(seed, n, gemma3.tokenizer)
               for seed, n in enumerate(GEMMA_PROMPT_TOKENS)]
    refs = [mlx_lm_reference(gemma3.model, p, GEMMA_TOKENS) for p in prompts]
    return gemma3, prompts, refs


def test_gemma3_across_sliding_window_matches_mlx_lm(gemma):
    loaded, prompts, refs = gemma
    windows = {c.max_size for c in loaded.model.make_cache() if hasattr(c, "max_size")}
    assert windows == {512}
    assert min(len(p) for p in prompts) < 512 < min(len(p) for p in prompts) + GEMMA_TOKENS
    llm = make_llm(loaded, max_batched=128)
    outs = llm.generate(prompts, greedy_params(GEMMA_TOKENS, NUM_TOP))
    assert_matches(outs, refs, NUM_TOP, TOL)


# -- int8 pool vs decode-then-attend ------------------------------------------------------
def test_smollm2_int8_pool_matches_decode_then_attend(smollm2, monkeypatch):
    """Each prompt runs alone, so the engine does the reference's work in the same order.

    Rounding to int8 turns fp32-level differences into whole quantisation steps, which then
    grow from layer to layer: the same prompts batched together, or mlx-lm's generate_step
    (prompt[:-1], then the last token), already differ from this reference by ~0.1-0.2 in
    logprob, and greedy ids can part. In the same order the K/V values are bit-identical.
    The compiled CPU primitive sums in another order (its ~1e-6 differences flip a rounding
    step within ~60 tokens), so this test runs the engine's reference attention; the
    primitive is held to the reference on int8 pools by tests/kernels/ and the codec oracles
    of tests/engine/test_equivalence.py. For the same reason the engine's linears use MLX's
    matmul here, like the reference's (the compiled small-M linear flipped a step near token
    56; it is held to MLX's matmul by tests/kernels/test_small_m_linear.py and the SmolLM2
    parity of tests/kernels/test_linear_seam.py).
    """
    import mlxkv.attention

    monkeypatch.setattr(mlxkv.attention, "default_decode_op", lambda *args, **kwargs: None)
    model = smollm2.model
    prompts = [smol_prompts(smollm2.tokenizer)[i] for i in (0, 4)]
    codecs = parse_kv_codec("int8", len(model.layers))
    llm = make_llm(smollm2, kv_codec="int8", enable_prefix_caching=False, linear="reference")
    assert {c.name for pair in llm.engine.store.codecs.values() for c in pair} == {"int8"}
    assert llm.engine.kernels.report()["backend"] == "reference"
    for prompt in prompts:
        cache = [CodecRoundTripCache(*codecs[i]) for i in range(len(model.layers))]
        ref = cache_loop_reference(model, prompt, INT8_TOKENS, cache)
        out = llm.generate([prompt], greedy_params(INT8_TOKENS, NUM_TOP))[0]
        assert_matches([out], [ref], NUM_TOP, TOL)
