"""Speculative decoding: the drafter and sizing (pure), and greedy exactness in the batch.

Exactness is judged by the logit oracles: a speculating run must emit the plain run's
tokens, and the logits each accepted token was chosen from must equal the plain run's
(tests/oracles.py `assert_same`), across chunked prefills, sliding windows, compressed
pools, prefix hits and forks sharing a copy-on-write tail.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from oracles import PROMPT, assert_same, make_llm, run
from spec_helpers import FLAT, CharTokenizer, oracle_drafter, spec_llm

from mlxkv.config import (
    CPU_STEP_COST,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
    roofline_cost,
)
from mlxkv.llm import LLM
from mlxkv.models.tiny import make_tiny_model
from mlxkv.request import Request
from mlxkv.sampling import SamplingParams
from mlxkv.speculative import (
    NgramIndex,
    Speculator,
    best_num_drafts,
    can_speculate,
    max_drafts_allowed,
    ngram_propose,
    step_time,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


# -- the drafter and the sizing policy (no model) --------------------------------------------
@pytest.mark.parametrize(("ids", "k", "min_n", "want"), [
    ([1, 2, 3, 4, 8, 9, 2, 3], 3, 1, [4, 8, 9]),  # "2 3" seen at 1: continue from there
    ([1, 2, 3, 4, 8, 9, 2, 3], 9, 1, [4, 8, 9, 2, 3]),  # runs to the end of the history
    ([1, 2, 5, 1, 2, 6, 1, 2], 3, 1, [6, 1, 2]),  # the latest occurrence wins
    ([7, 1, 2, 3, 8, 2, 3, 5, 1, 2, 3], 4, 1, [8, 2, 3, 5]),  # the longest n-gram wins
    ([1, 2, 3, 1], 3, 2, []),  # only a 1-gram matches, min_n is 2
    ([1, 2, 3, 1], 3, 1, [2, 3, 1]),
    ([1, 2, 3, 1], 0, 1, []),
    ([5], 3, 1, []),
])
def test_ngram_propose(ids, k, min_n, want):
    assert ngram_propose(ids, k, min_n=min_n, max_n=3) == want


@pytest.mark.parametrize(("min_n", "max_n"), [(1, 3), (2, 4), (3, 3)])
def test_the_incremental_index_answers_as_the_scan(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    for _ in range(20):
        index, ids = NgramIndex(min_n, max_n), []
        for _ in range(40):  # grow by 0..3 tokens between lookups, as decoding and verifying do
            ids += [rng.randrange(5) for _ in range(rng.randrange(4))]
            k = rng.randrange(6)
            assert index.propose(ids, k) == ngram_propose(ids, k, min_n, max_n), (ids, k)
        shorter = ids[: len(ids) // 2]  # another list: the index starts again
        assert index.propose(shorter, 4) == ngram_propose(shorter, 4, min_n, max_n)


def decoding(params: SamplingParams, num_prompt=10, num_output=3, limit=1 << 30) -> Request:
    req = Request("r", list(range(1, num_prompt + 1)), params, max_total_tokens=limit)
    req.output_token_ids = [1, 2, 3, 4][:num_output]
    req.num_computed_tokens = req.num_tokens - 1
    return req


def test_drafts_never_pass_the_token_limits():
    assert max_drafts_allowed(decoding(SamplingParams(max_tokens=5)), 8) == 1  # 2 left
    assert max_drafts_allowed(decoding(SamplingParams(max_tokens=4)), 8) == 0
    assert max_drafts_allowed(decoding(SamplingParams(max_tokens=None), limit=16), 8) == 2
    assert max_drafts_allowed(decoding(SamplingParams(max_tokens=99)), 8) == 8


@pytest.mark.parametrize(("params", "default_on", "want"), [
    (SamplingParams(), True, True),
    (SamplingParams(), False, False),
    (SamplingParams(speculative=True), False, True),
    (SamplingParams(speculative=False), True, False),
    (SamplingParams(repetition_penalty=1.1), True, False),
    (SamplingParams(presence_penalty=0.5), True, False),
])
def test_who_speculates(params, default_on, want):
    assert can_speculate(decoding(params), default_on) is want


def test_a_request_in_prefill_does_not_speculate():
    req = decoding(SamplingParams(speculative=True))
    req.num_computed_tokens = 4
    assert not can_speculate(req, True)


def test_sizing_drafts_deep_alone_and_not_at_all_in_a_big_batch():
    def proposed(num_running, accepted_history=0):
        spec = Speculator(SpeculativeConfig(method="ngram", step_cost=roofline_cost(8.0)),
                          drafter=lambda ids, k: [7] * k)
        reqs = [decoding(SamplingParams(max_tokens=99)) for _ in range(num_running)]
        for r in reqs:
            for _ in range(accepted_history):
                spec.record(r, 8, 8)
        spec.propose(reqs)
        return [len(r.spec_token_ids) for r in reqs]

    # prior acceptance 1/2: 0.5, 0.25, 0.125 pass MIN_GAIN (0.1), 0.0625 does not
    assert proposed(1) == [3]
    assert proposed(1, accepted_history=10) == [7]  # ~0.95: every free row (1 + 7 = 8)
    assert proposed(4, accepted_history=10) == [1, 1, 1, 1]  # 4 + 4 rows fill the 8
    assert proposed(8, accepted_history=10) == [0] * 8  # compute-bound: no drafts


# A step-time curve shaped like this CPU's: rows are cheap up to the compiled linear's 24,
# a step jumps past them, and then every row costs its compute.
JUMP = ((1, 1.0), (8, 1.6), (24, 2.6), (25, 3.6), (50, 7.2))


def test_step_time_interpolates_the_curve():
    assert step_time(JUMP, 1) == step_time(JUMP, 0.5) == 1.0
    assert step_time(JUMP, 16) == pytest.approx(2.1)
    assert step_time(JUMP, 24.5) == pytest.approx(3.1)
    assert step_time(JUMP, 75) == pytest.approx(10.8)  # the last segment's slope
    assert step_time(((1, 1.0),), 99) == 1.0  # one knot: every row free
    assert step_time(roofline_cost(8.0), 8) == 1.0
    assert step_time(roofline_cost(8.0), 16) == pytest.approx(2.0)


def test_best_num_drafts_maximises_tokens_per_time():
    def cost(rows):
        return step_time(JUMP, rows)

    assert best_num_drafts([], 8, cost) == 0
    assert best_num_drafts([0.9] * 40, 8, cost) == 16  # up to 24 rows; row 25 jumps
    assert best_num_drafts([0.3] * 40, 8, cost) == 0  # (8 + 0.3 e) / cost falls from e = 0
    assert best_num_drafts([0.5, 0.25, 0.125], 1, cost) == 2
    flat = ((1, 1.0),)
    assert best_num_drafts([0.5, 0.2], 1, lambda r: step_time(flat, r)) == 2  # free rows


def _sized(histories, curve=JUMP) -> list[int]:
    """Drafts per request of a batch, each request's history (drafts, accepted) x 10."""
    spec = Speculator(SpeculativeConfig(method="ngram", step_cost=curve),
                      drafter=lambda ids, k: [7] * k)
    reqs = [decoding(SamplingParams(max_tokens=99)) for _ in histories]
    for r, (num_drafts, num_accepted) in zip(reqs, histories, strict=True):
        for _ in range(10):
            spec.record(r, num_drafts, num_accepted)
    spec.propose(reqs)
    assert spec.would_draft(reqs) == any(r.spec_token_ids for r in reqs)
    return [len(r.spec_token_ids) for r in reqs]


def test_sizing_fills_the_cheap_rows_and_stops_at_the_jump():
    accepted = (8, 8)  # an estimate of 0.97
    assert _sized([accepted] * 8) == [2] * 8  # 8 + 16 = 24 rows: the last cheap one
    assert _sized([accepted]) == [8]  # alone: k = 8, well inside the cheap rows
    assert _sized([accepted] * 16) == [1] * 8 + [0] * 8  # 24 rows again
    assert _sized([accepted] * 24) == [0] * 24  # past the jump: no drafts
    assert _sized([(0, 0)] * 8) == [1] * 8  # the prior 1/2: one draft each


def test_sizing_gives_depth_to_the_requests_whose_drafts_are_accepted():
    accepted, rejected = (8, 8), (2, 0)  # estimates 0.97 and 0.16
    assert _sized([accepted] * 4 + [rejected] * 4) == [4] * 4 + [0] * 4
    assert _sized([accepted] * 3 + [rejected] * 5) == [6, 5, 5, 0, 0, 0, 0, 0]
    assert _sized([rejected] * 8) == [0] * 8


def test_a_request_that_does_not_draft_keeps_scoring_its_guesses():
    """Prompt lookup's first draft of a request that does not draft is scored against the
    token that comes: the estimate recovers once the lookup guesses right (a request whose
    early drafts failed is not shut out for good), without touching the verified-draft
    counters; a request that drafts is scored by its verification only."""
    spec = Speculator(SpeculativeConfig(method="ngram", step_cost=roofline_cost(8.0)),
                      drafter=lambda ids, k: [7] * k)
    reqs = [decoding(SamplingParams(max_tokens=99)) for _ in range(8)]
    for r in reqs:
        for _ in range(10):
            spec.record(r, 2, 0)
    low = reqs[0].spec.acceptance
    for _ in range(12):
        spec.propose(reqs)  # 8 rows fill the roofline's free rows: no drafts
        assert not any(r.spec_token_ids for r in reqs)
        for r in reqs:
            r.output_token_ids.append(7 if r is not reqs[-1] else 8)  # the last misses
            r.num_computed_tokens += 1
            spec.observe(r)
    assert reqs[0].spec.acceptance > 0.8 > low
    assert reqs[-1].spec.acceptance < low
    assert [r.spec.num_proposed for r in reqs] == [20] * 8
    alone = reqs[:1]
    spec.propose(alone)  # alone, it drafts: its guess gives way to the verification
    assert alone[0].spec_token_ids and alone[0].spec.guess is None
    before = alone[0].spec.acceptance
    alone[0].output_token_ids.append(7)
    spec.observe(alone[0])
    assert alone[0].spec.acceptance == before


def test_this_cpus_curve_drafts_where_eight_requests_are_accepted():
    """The default curve (SmolLM2 on 2 cores, compiled linear): at 8 requests, drafts
    accepted ~0.85 of the time fill the 24 cheap rows; rejected ones draft nothing."""
    assert SpeculativeConfig().step_cost == CPU_STEP_COST
    assert _sized([(1, 1)] * 8, CPU_STEP_COST) == [2] * 8  # estimate 0.85: 24 rows
    assert _sized([(2, 1)] * 8, CPU_STEP_COST) == [1] * 8  # 0.5: 16 rows
    assert _sized([(2, 0)] * 8, CPU_STEP_COST) == [0] * 8  # 0.16
    assert _sized([(8, 8)] * 4 + [(2, 0)] * 4, CPU_STEP_COST) == [4] * 4 + [0] * 4
    assert _sized([(8, 8)], CPU_STEP_COST) == [8]


@pytest.mark.parametrize("curve", [(), ((0, 1.0),), ((1, 1.0), (1, 2.0)),
                                   ((1, 1.0), (8, 0.5)), ((1, 0.0),)])
def test_a_step_cost_curve_must_be_increasing_rows_and_not_decreasing_times(curve):
    with pytest.raises(ValueError, match="step_cost"):
        SpeculativeConfig(method="ngram", step_cost=curve)


class _CostOnly:
    """A ModelDrafter for sizing only (propose is never reached in these checks)."""

    def __init__(self, relative_cost: float):
        self.relative_cost = relative_cost


def test_sizing_charges_each_draft_model_step():
    """A draft step costs relative_cost target steps, shared by every drafting request:
    free (0) sizes as prompt lookup does; the target drafting for itself (1) never pays;
    a cheap draft drafts shallow until its drafts are accepted."""
    def depths(cost, num_running=1, accepted_history=0):
        config = SpeculativeConfig(method="draft", draft_model="d",
                                   step_cost=roofline_cost(8.0))
        spec = Speculator(config, model=_CostOnly(cost))
        reqs = [decoding(SamplingParams(max_tokens=99)) for _ in range(num_running)]
        for r in reqs:
            for _ in range(accepted_history):
                spec.record(r, 8, 8)
        return spec._size_drafts(list(spec._candidates(reqs)), len(reqs))

    assert depths(0.0) == [3] and depths(0.0, accepted_history=10) == [7]  # as n-gram
    assert depths(1.0) == [0] and depths(1.0, accepted_history=10) == [0]
    assert depths(0.3) == [1]  # prior 1/2: a second step would cost more than it yields
    assert depths(0.3, accepted_history=10) == [7]
    assert depths(0.3, num_running=4, accepted_history=10) == [1, 1, 1, 1]
    assert depths(0.3, num_running=8, accepted_history=10) == [0] * 8


# -- greedy exactness in the continuous batch --------------------------------------------
def check_spec_vs_plain(model, prompts, params=GREEDY, corrupt_every=4, atol=1e-3, **llm_kw):
    """Speculating (oracle drafts with rejections) == plain, logits at every accepted token."""
    plain = make_llm(model, **llm_kw)
    ref = run(plain, prompts, params)
    fulls = [p + ref[f"r{i}"].token_ids for i, p in enumerate(prompts)]
    llm = spec_llm(model, oracle_drafter(fulls, corrupt_every), **llm_kw)
    got = run(llm, prompts, params)
    for i in range(len(prompts)):
        assert_same(got[f"r{i}"], ref[f"r{i}"], f"speculative r{i}", atol)
    c = llm.engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"], c
    assert llm.engine.stats["steps"] < plain.engine.stats["steps"]


def test_greedy_equals_plain_with_prefill_chunks_in_the_batch():
    prompts = [PROMPT[:n] for n in (3, 17, 37, 9)] + [PROMPT[2:19]]
    check_spec_vs_plain(make_tiny_model("llama"), prompts, max_batched=12)


def test_steps_pipeline_while_the_drafter_finds_nothing():
    """Free-form text (no n-gram match) must not pay for speculation: a step whose requests
    have no drafts in their known tokens launches the next one before it waits; a step
    that will verify drafts does not, nor does a step that verifies drafts (even when the
    drafter finds none right after: "flipping"). Greedy output stays the plain run's across
    the switches, logits included."""
    model = make_tiny_model("llama")
    prompts = [PROMPT[:13], PROMPT[4:21]]
    ref = run(make_llm(model), prompts, GREEDY)
    fulls = [p + ref[f"r{i}"].token_ids for i, p in enumerate(prompts)]
    oracle = oracle_drafter(fulls, corrupt_every=3)

    def sometimes(token_ids, max_drafts):  # drafts in two of every five positions
        return oracle(token_ids, max_drafts) if len(token_ids) % 5 < 2 else []

    calls = [0]

    def flipping(token_ids, max_drafts):  # drafts at a proposal, none when asked right after
        calls[0] += 1
        return oracle(token_ids, max_drafts) if calls[0] % 2 else []

    overlapped = {}
    for name, drafter in (("never", lambda ids, k: []), ("always", oracle),
                          ("sometimes", sometimes), ("flipping", flipping)):
        llm = spec_llm(model, drafter)
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, GREEDY)
        tokens = {f"r{i}": [] for i in range(len(prompts))}
        overlapped[name] = 0
        while engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
            overlapped[name] += engine._inflight is not None
        assert engine.cache_stats()["blocks_used"] == 0
        assert tokens == {k: v.token_ids for k, v in ref.items()}, name
    assert overlapped["never"] > 15 and overlapped["always"] == 0
    assert 0 < overlapped["sometimes"] < overlapped["never"]
    got = run(spec_llm(model, sometimes), prompts, GREEDY)
    for key, want in ref.items():
        assert_same(got[key], want, f"pipelined speculation {key}")


def test_a_step_that_verifies_drafts_does_not_pipeline_the_next():
    """The next step's sizing may find no draft worth its rows (a request admitted in the
    step that verifies r0's drafts fills the free rows), yet the step in flight still
    verifies drafts: its requests' next inputs are known only at its update, so it must
    not overlap the next step (this used to fail r0 with a KeyError)."""
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT[:13], PROMPT[4:21]]
    ref = run(make_llm(model), prompts, params)
    fulls = [p + ref[f"r{i}"].token_ids for i, p in enumerate(prompts)]
    engine = spec_llm(model, oracle_drafter(fulls, corrupt_every=3), step_cost=roofline_cost(2.0)).engine
    engine.add_request("r0", prompts[0], params)
    tokens = {"r0": [], "r1": []}
    num_steps = 0
    while engine.has_unfinished():
        if num_steps == 3:  # r0 is decoding with a draft: r1's prefill joins its step
            engine.add_request("r1", prompts[1], params)
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            tokens[out.request_id] += out.new_token_ids
        num_steps += 1
    assert tokens == {key: trace.token_ids for key, trace in ref.items()}
    assert engine.speculator.counters["spec_accepted_tokens"] > 0


def _verifying(batch) -> bool:
    """Whether a batch has a verification chunk (every row of a multi-row chunk sampled)."""
    starts = batch.query_start_loc
    return any(1 < starts[i + 1] - starts[i] == batch.num_logits_list[i]
               for i in range(batch.num_seqs))


def test_verification_rows_run_through_the_fused_prefill_twin(monkeypatch):
    """head_dim 64: the compiled CPU op covers the layers, so a batch with verification
    chunks runs in the fused prefill twin (one primitive call), and equals plain decoding."""
    from mlxkv.kernels.selfcheck import KernelGuard

    calls = []
    real = KernelGuard.prefill

    def counting(self, q, store, layer_id, tables, batch, scale, window):
        out = real(self, q, store, layer_id, tables, batch, scale, window)
        if _verifying(batch):
            calls.append(out is not None)
        return out

    monkeypatch.setattr(KernelGuard, "prefill", counting)
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    check_spec_vs_plain(model, [PROMPT, PROMPT[3:20]], max_batched=12)
    assert calls and all(calls)


def test_verification_rows_run_through_the_fused_decode_op(monkeypatch):
    """Without a prefill twin (as on Metal), drafts are verified as decode rows of the op
    (mlxkv.attention._verify_rows), and still equal plain decoding."""
    import mlxkv.attention as attention
    from mlxkv.kernels.selfcheck import KernelGuard

    calls = []

    def counting(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    real = attention._verify_rows
    monkeypatch.setattr(attention, "_verify_rows", counting)
    monkeypatch.setattr(KernelGuard, "prefill", lambda self, *args: None)
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    check_spec_vs_plain(model, [PROMPT, PROMPT[3:20]], max_batched=12)
    assert calls and all(calls)


def test_greedy_equals_plain_with_a_sliding_window():
    """gemma3: window 8 with block 4, so drafts and rewinds cross dropped blocks."""
    check_spec_vs_plain(make_tiny_model("gemma3_text"), [PROMPT, PROMPT[4:30]])


# atol: as tests/engine/test_equivalence.py (an fp32-noise difference in a K/V value on an
# affine rounding boundary takes the neighbouring code).
@pytest.mark.parametrize(("codec", "atol"), [("int8", 0.1), ("e8:k4v3", 1e-3)])
def test_greedy_equals_plain_over_compressed_blocks(codec, atol):
    """Rejected drafts' slots in compressed blocks are rewritten exactly as never written."""
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)  # the affine codecs group 64 coordinates
    check_spec_vs_plain(model, [PROMPT, PROMPT[5:26]], atol=atol, kv_codec=codec)


def test_rewinds_never_touch_shared_prefix_or_fork_blocks():
    """A cached prefix and an n=2 fork's shared tail stay intact under rewinds."""
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, n=2)
    prompts = [PROMPT[:30], PROMPT[:25] + [9, 8, 7]]
    ref = {i: run(make_llm(model), [p], GREEDY)["r0"] for i, p in enumerate(prompts)}
    fulls = [p + ref[i].token_ids for i, p in enumerate(prompts)]
    llm = spec_llm(model, oracle_drafter(fulls, corrupt_every=3))
    run(llm, [PROMPT])  # warm the prefix cache
    got = run(llm, prompts, params)
    for key in ("r0", "r0#1", "r1", "r1#1"):
        want = ref[int(key[1])]
        assert_same(got[key], type(want)(want.token_ids[:20], want.logits[:20]), key)
    assert llm.engine.cache.counters["hit_tokens"] > 0
    warm = run(llm, [PROMPT])["r0"]  # the cached blocks still hold the prompt's K/V
    assert_same(warm, run(make_llm(model), [PROMPT])["r0"], "prefix after rewinds")


@pytest.mark.parametrize("stop", ["token", "string", "max_tokens", "eos"])
def test_stops_at_the_same_token(stop):
    model = make_tiny_model("llama")
    plain = LLM(EngineConfig(cache=CacheConfig(block_size=4, num_blocks=128)),
                loaded=(model, CharTokenizer()))
    base = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = plain.generate([PROMPT], base)[0]
    stop_at = ref["token_ids"][9]
    kw = {"token": dict(stop_token_ids=(stop_at,)), "max_tokens": dict(max_tokens=11),
          "string": dict(stop=(ref["text"][10:13],)), "eos": dict(ignore_eos=False)}[stop]
    params = replace(base, **kw)
    config = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=128),
                          scheduler=SchedulerConfig(),
                          speculative=SpeculativeConfig(method="ngram", step_cost=FLAT))
    outs = []
    for llm in (plain, LLM(config, loaded=(model, CharTokenizer()))):
        llm.engine.eos_token_ids = {stop_at}
        if llm is not plain:
            llm.engine.speculator.drafter = oracle_drafter([PROMPT + ref["token_ids"]], 5)
        outs.append(llm.generate([PROMPT], params)[0])
    keys = ("token_ids", "text", "finish_reason")
    assert {k: outs[1][k] for k in keys} == {k: outs[0][k] for k in keys}
    assert len(outs[0]["token_ids"]) < 30


def test_logprobs_equal_plain():
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    ref = make_llm(model).generate([PROMPT], params)[0]
    llm = spec_llm(model, oracle_drafter([PROMPT + ref["token_ids"]]))
    got = llm.generate([PROMPT], params)[0]
    assert got["token_ids"] == ref["token_ids"]
    for a, b in zip(got["logprobs"], ref["logprobs"], strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert a.top.keys() == b.top.keys()
