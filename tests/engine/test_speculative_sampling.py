"""Sampled speculative decoding keeps the target distribution (chi-square tests).

The rejection rule for a point-mass drafter: accept the draft d with probability p(d),
otherwise draw from p with d removed. Each emitted token must then be distributed as p.
The tests compare empirical counts with p by Pearson's chi-square test at a 1e-3 level,
and show that the test rejects the naive rule (redraw from p itself on rejection).
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from oracles import PROMPT
from scipy.stats import chisquare
from spec_helpers import draft_llm, spec_llm

from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams
from mlxkv.spec_verify import rejection_sample

LEVEL = 1e-3


def chi2_pvalue(samples, probs: np.ndarray) -> float:
    """Pearson's test of samples against probs; tokens expected < 5 times are pooled."""
    counts = Counter(int(s) for s in samples)
    n = sum(counts.values())
    probs = np.asarray(probs, dtype=np.float64)
    expected = probs / probs.sum() * n
    big = np.flatnonzero(expected >= 5)
    observed = [counts.get(int(t), 0) for t in big]
    exp = list(expected[big])
    rest_exp = n - sum(exp)
    if rest_exp >= 5:
        observed.append(n - sum(observed))
        exp.append(rest_exp)
    exp = [e * sum(observed) / sum(exp) for e in exp]  # (pooled rest < 5: renormalise)
    return float(chisquare(observed, exp).pvalue)


P = np.array([[0.4, 0.3, 0.15, 0.1, 0.05],  # judges d1 = 1 (p = 0.3)
              [0.1, 0.2, 0.3, 0.25, 0.15],  # judges d2 = 2 (p = 0.3)
              [0.05, 0.15, 0.2, 0.25, 0.35]], dtype=np.float32)  # the bonus


def emitted(accept: np.ndarray, alt: np.ndarray, drafts) -> list[list[int]]:
    out = []
    for acc, alts in zip(accept, alt, strict=True):
        num = 0
        while num < len(drafts) and acc[num]:
            num += 1
        out.append(list(drafts[:num]) + [int(alts[num])])
    return out


def test_rejection_sampler_keeps_each_position_distribution():
    B, drafts = 20000, [1, 2]
    probs = mx.broadcast_to(mx.array(P)[None], (B, *P.shape))
    accept, alt = rejection_sample(probs, mx.array([drafts] * B), mx.random.key(3))
    seqs = emitted(np.array(accept), np.array(alt), drafts)
    assert chi2_pvalue([s[0] for s in seqs], P[0]) > LEVEL
    assert chi2_pvalue([s[1] for s in seqs if len(s) > 1], P[1]) > LEVEL
    assert chi2_pvalue([s[2] for s in seqs if len(s) > 2], P[2]) > LEVEL
    # the test has power: redrawing from p itself (not p without d) over-weights d
    naive = mx.random.categorical(mx.log(mx.array(P[0])), shape=(B,), key=mx.random.key(4))
    first = np.where(np.array(accept)[:, 0], drafts[0], np.array(naive))
    assert chi2_pvalue(first, P[0]) < 1e-6


@pytest.mark.parametrize("drafter", ["greedy oracle", "draft model"])
def test_engine_sampling_with_drafts_keeps_the_distribution(drafter):
    """Tiny model, temperature 1: after token t1, the verified token and the bonus token
    follow the model's conditional distributions. The draft is the model's own argmax:
    from a test drafter, or from the model drafting for itself (`--speculative draft`,
    which always proposes greedily: a point mass, so the rejection rule stays exact)."""
    model = make_tiny_model("llama")
    prompt = PROMPT[:20]

    def probs(ids):
        return np.array(mx.softmax(model(mx.array(ids)[None])[0, -1].astype(mx.float32)))

    def greedy_drafter(ids, max_drafts):
        return [int(np.argmax(probs(ids)))][:max_drafts]

    if drafter == "draft model":
        llm = draft_llm(model, model, max_seqs=128, num_blocks=1024)
    else:
        llm = spec_llm(model, greedy_drafter, max_seqs=128, num_blocks=1024)
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)
    outs = llm.generate([prompt] * 600, params)
    t1 = Counter(o["token_ids"][0] for o in outs).most_common(1)[0][0]
    seqs = [o["token_ids"] for o in outs if o["token_ids"][0] == t1]
    p2 = probs(prompt + [t1])
    draft = int(np.argmax(p2))
    assert chi2_pvalue([s[1] for s in seqs], p2) > LEVEL
    bonus = [s[2] for s in seqs if s[1] == draft]
    assert len(bonus) >= 50
    assert chi2_pvalue(bonus, probs(prompt + [t1, draft])) > LEVEL
    c = llm.engine.speculator.counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_proposed_tokens"]
