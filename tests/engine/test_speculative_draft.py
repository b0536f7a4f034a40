"""Speculation with a draft model (`--speculative draft`): exactness, rewinds, no leaks.

The draft model (mlxkv.draft_model) runs on its own paged pool, keyed by the target's
request ids. The oracles:
  * greedy output, and the logits every accepted token was chosen from, equal plain
    decoding (tests/oracles.py `assert_same`);
  * every proposal equals the draft model's own greedy continuation of the committed
    tokens, computed with mlx-lm's dense KV cache: a draft cache that is not rewound, or
    one that reads a wrong slot, fails here although verification keeps the output exact;
  * after every step both pools keep their invariants, the draft holds at most the
    tokens the target has computed, and nothing is left in either pool at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from oracles import PROMPT, Trace, assert_same, greedy_cache_loop, make_llm, run
from spec_helpers import draft_llm

from mlxkv import cli
from mlxkv.config import EngineConfig, ModelConfig, SpeculativeConfig
from mlxkv.draft_model import DraftModel
from mlxkv.errors import ModelLoadError
from mlxkv.llm import LLM
from mlxkv.models.adapter import truncated
from mlxkv.models.tiny import make_tiny_model
from mlxkv.request import RequestStatus
from mlxkv.sampling import SamplingParams
from mlxkv.speculative import Speculator

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [PROMPT[:n] for n in (3, 17, 37, 9)] + [PROMPT[2:19]]


def recording(llm) -> list[tuple[list[int], list[int]]]:
    """Record every proposal of the engine's draft model: (known token ids, drafts)."""
    draft = llm.engine.speculator.model
    calls: list[tuple[list[int], list[int]]] = []
    propose = draft.propose

    def recorded(seqs):
        out = propose(seqs)
        calls.extend((list(ids), drafts) for (_, ids, _), drafts in zip(seqs, out, strict=True))
        return out

    draft.propose = recorded
    return calls


def check_proposals(draft_model, calls) -> None:
    """Each proposal is the draft model's greedy continuation (dense mlx-lm cache)."""
    drafted = [(ids, drafts) for ids, drafts in calls if drafts]
    assert drafted
    for ids, drafts in drafted:
        want = greedy_cache_loop(draft_model, ids, len(drafts)).token_ids
        assert drafts == want, f"after {len(ids)} tokens: proposed {drafts}, draft model {want}"


def check_drained(llm) -> None:
    draft = llm.engine.speculator.model
    draft.cache.check_invariants()
    assert draft.stats()["blocks_used"] == 0 and draft.stats()["num_requests"] == 0


def perturbed(arch: str = "llama", seed: int = 7, scale: float = 0.05):
    """Another model: the tiny model's weights, each scaled by 1 + N(0, scale) noise."""
    model = make_tiny_model(arch)
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p * (1 + scale * mx.random.normal(p.shape)),
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def test_the_target_as_its_own_draft_accepts_every_draft():
    """Same weights: every greedy draft is the target's argmax, so all are accepted; the
    output and its logits are plain decoding's. A 12-token budget chunks the draft's
    prompt prefill (proposals of a sequence still prefilling are empty)."""
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = make_llm(model, max_batched=12)
    ref = run(plain, PROMPTS, params)
    llm = draft_llm(model, model, max_batched=12)
    calls = recording(llm)
    got = run(llm, PROMPTS, params)
    for key, want in ref.items():
        assert_same(got[key], want, f"self-drafted {key}")
    c = llm.engine.speculator.counters
    assert c["spec_proposed_tokens"] > 50 and c["spec_accepted_tokens"] == c["spec_proposed_tokens"]
    assert llm.engine.stats["steps"] < plain.engine.stats["steps"] * 2 // 3
    assert any(not drafts for _, drafts in calls)  # chunked draft prefill
    check_proposals(model, calls)
    check_drained(llm)


@pytest.mark.parametrize(("arch", "kind"), [
    ("llama", "early exit (2 of 3 layers)"), ("llama", "perturbed weights"),
    ("gemma3_text", "perturbed weights")])  # sliding-window groups in the draft pool too
def test_another_draft_model_keeps_greedy_exact(arch, kind):
    """A draft that is often wrong: rejections rewind both pools; output and logits stay
    plain decoding's, and every proposal continues the committed tokens."""
    model = make_tiny_model(arch)
    ref = run(make_llm(model), PROMPTS)
    if kind.startswith("early"):
        llm, draft_model = draft_llm(model, model, layers=2), truncated(model, 2)
    else:
        draft_model = perturbed(arch)
        llm = draft_llm(model, draft_model)
    calls = recording(llm)
    got = run(llm, PROMPTS)
    for key, want in ref.items():
        assert_same(got[key], want, f"{kind} {key}")
    c = llm.engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"], c
    check_proposals(draft_model, calls)
    check_drained(llm)


def test_a_failing_draft_step_costs_drafts_not_requests():
    """Every third draft forward raises: those proposals come back empty (their draft KV
    is freed and recomputed), and every request still decodes as plainly."""
    model = make_tiny_model("llama")
    ref = run(make_llm(model), PROMPTS)
    llm = draft_llm(model, model)
    draft = llm.engine.speculator.model
    forward, num_calls = draft.runner.forward, itertools.count()

    def flaky(batch):
        if next(num_calls) % 3 == 1:
            raise RuntimeError("injected draft failure")
        return forward(batch)

    draft.runner.forward = flaky
    got = run(llm, PROMPTS)
    for key, want in ref.items():
        assert_same(got[key], want, f"flaky draft {key}")
    assert next(num_calls) > 6 and llm.engine.speculator.counters["spec_accepted_tokens"] > 0
    check_drained(llm)


def _random_request(rng: random.Random):
    motif = [rng.randrange(1, 500) for _ in range(rng.randint(3, 7))]
    prompt = motif * rng.randint(2, 4) + [rng.randrange(1, 500) for _ in range(rng.randint(1, 9))]
    params = SamplingParams(max_tokens=rng.randint(4, 30), ignore_eos=True,
                            temperature=rng.choice([0.0, 0.0, 0.8]), n=rng.choice([1, 1, 2]))
    return prompt, params


def test_aborts_preemptions_and_rewinds_leak_no_draft_block():
    """Random arrivals and aborts, pools too small for the batch (the target preempts, the
    draft runs short), an early-exit draft (frequent rejections). After every step both
    pools keep their invariants, the draft holds at most the computed tokens of each
    running request and nothing of a waiting one; at the end both pools are empty."""
    rng = random.Random(0)
    model = make_tiny_model("llama")
    llm = draft_llm(model, model, layers=2, num_blocks=40, max_batched=24, max_seqs=8)
    engine = llm.engine
    draft = engine.speculator.model
    num_added = num_aborted = 0
    while num_added < 30 or engine.has_unfinished():
        if num_added < 30 and rng.random() < 0.4:
            engine.add_request(f"q{num_added}", *_random_request(rng))
            num_added += 1
        live = engine.scheduler.running + list(engine.scheduler.waiting)
        if live and rng.random() < 0.06:
            num_aborted += engine.abort(rng.choice(live).user_id)
        for out in engine.step():
            assert out.finish_reason != "error", out.error
        engine.cache.check_invariants()
        draft.cache.check_invariants()
        for req in engine.scheduler.running:
            assert engine.cache.num_tokens(req.request_id) == req.num_computed_tokens
            assert draft.num_tokens(req.request_id) <= req.num_computed_tokens, req.request_id
        assert not any(draft.cache.has_request(r.request_id) for r in engine.scheduler.waiting)
    assert engine.cache_stats()["blocks_used"] == 0
    check_drained(llm)
    assert engine.scheduler.num_preemptions > 0 and num_aborted > 0
    c = engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"], c


# -- configuration and surfaces ---------------------------------------------------------
def test_draft_configuration_errors():
    with pytest.raises(ValueError, match="--draft-model"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="only used with --speculative draft"):
        SpeculativeConfig("ngram", draft_model="m")
    with pytest.raises(ValueError, match="--draft-layers needs --draft-model"):
        SpeculativeConfig("off", draft_layers=2)
    with pytest.raises(ValueError, match="draft_layers"):
        SpeculativeConfig("draft", draft_model="m", draft_layers=0)
    args = cli.build_parser().parse_args(["generate", "x", "--speculative", "draft",
                                          "--draft-model", "m", "--draft-layers", "8"])
    spec = EngineConfig.from_args(args).speculative
    assert (spec.method, spec.draft_model, spec.draft_layers, spec.draft_cost) == (
        "draft", "m", 8, None)


def test_cli_draft_without_a_draft_model_is_one_line(capsys):
    assert cli.main(["generate", "x", "--speculative", "draft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draft-model" in err[0] and "Traceback" not in err[0]


def test_a_draft_with_another_vocabulary_is_refused():
    model = make_tiny_model("llama")
    other = make_tiny_model("llama", vocab_size=256)
    with pytest.raises(ModelLoadError, match="does not share the target's tokenizer"):
        draft_llm(model, other)
    with pytest.raises(ModelLoadError, match="--draft-layers must be in 1..3"):
        draft_llm(model, model, layers=4)


def test_serve_refuses_gemma_drafting_for_smollm2(smollm2_dir, gemma3_dir):
    """One line, exit status 2, from the engine thread that builds the engine (which used
    to abort the process with status 134 when it ended as the interpreter exited)."""
    argv = [sys.executable, "-m", "mlxkv.cli", "serve", "--model", str(smollm2_dir),
            "--speculative", "draft", "--draft-model", str(gemma3_dir), "--port", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    err = [line for line in proc.stderr.splitlines() if "PyTorch" not in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "does not share the target's tokenizer" in err[0], err


# -- SmolLM2 drafting for itself --------------------------------------------------------
PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at six, carrying a "
           "can of oil and a cloth for the lens.")


def test_smollm2_early_exit_draft_greedy_equals_mlx_lm(smollm2, smollm2_dir):
    """`--draft-model smollm2 --draft-layers 24`: the draft shares the target's weights;
    tokens and the logits of every accepted token equal mlx-lm's own greedy loop."""
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    steps = 24
    spec = SpeculativeConfig("draft", draft_model=str(smollm2_dir), draft_layers=24,
                             draft_cost=0.0, num_speculative_tokens=4)
    llm = LLM(EngineConfig(model=ModelConfig(str(smollm2_dir)), speculative=spec),
              loaded=smollm2)
    draft = llm.engine.speculator.model
    embed = smollm2.model.model.embed_tokens.weight
    assert draft.runner.model.model.embed_tokens.weight is embed  # shared, not reloaded
    assert len(draft.runner.model.layers) == 24 and len(smollm2.model.layers) == 30
    got = run(llm, [prompt], SamplingParams(max_tokens=steps, temperature=0.0,
                                            ignore_eos=True))["r0"]
    assert_same(got, greedy_cache_loop(smollm2.model, prompt, steps), "SmolLM2 draft",
                atol=3e-4)
    c = llm.engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"], c
    assert isinstance(got, Trace)
    check_drained(llm)


def test_cli_generate_with_a_draft_model_equals_plain(smollm2_dir, capsys):
    base = ["generate", "--chat", f"Repeat exactly: {PASSAGE}", "--max-tokens", "16",
            "--model", str(smollm2_dir)]
    draft = ["--speculative", "draft", "--draft-model", str(smollm2_dir), "--draft-layers",
             "24", "--draft-cost", "0"]
    outs = []
    for extra in ([], draft):
        assert cli.main(base + extra) == 0
        outs.append(capsys.readouterr())
    assert outs[1].out == outs[0].out
    assert "speculative:" in outs[1].err and "speculative:" not in outs[0].err


# -- planted bugs: each must fail a test above --------------------------------------------
def _draft_not_rewound(mp):
    mp.setattr(DraftModel, "rewind", lambda self, rid, ids: self._drafted.pop(rid, None))


def _draft_inputs_one_position_late(mp):
    decode_entry = DraftModel._decode_entry
    mp.setattr(DraftModel, "_decode_entry", lambda self, plan, j: decode_entry(self, plan, j + 1)
               if j + 1 < plan.num_drafts else decode_entry(self, plan, j))


def _draft_kept_on_preemption(mp):
    release = Speculator.release
    mp.setattr(Speculator, "release", lambda self, req: None
               if req.status is RequestStatus.WAITING else release(self, req))


def _early_exit_exact():
    test_another_draft_model_keeps_greedy_exact("llama", "early exit (2 of 3 layers)")


@pytest.mark.parametrize(("plant", "check"), [
    (_draft_not_rewound, _early_exit_exact),
    (_draft_not_rewound, test_aborts_preemptions_and_rewinds_leak_no_draft_block),
    (_draft_inputs_one_position_late, _early_exit_exact),
    (_draft_kept_on_preemption, test_aborts_preemptions_and_rewinds_leak_no_draft_block),
], ids=["not rewound/proposals", "not rewound/invariants", "positions/proposals",
        "kept on preemption/invariants"])
def test_planted_draft_bugs_are_caught(monkeypatch, plant, check):
    """Verification keeps the output exact whatever the draft does, so these bugs only
    cost speed: the proposal oracle and the per-step invariants must still see them."""
    plant(monkeypatch)
    with pytest.raises(AssertionError) as info:
        check()
    assert "error" not in str(info.value), info.value  # seen by a check, not a failed request
