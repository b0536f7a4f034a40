"""Verification of speculative drafts against the target's logits (pure mx + host resolve).

A sequence with drafts d_1..d_k is run over k + 1 query rows; logits row i is the target's
distribution for the token after position i, so row i judges d_{i+1} and row k gives the
bonus token:

    rows    [ t_last | d_1 | d_2 | ... | d_k ]      query rows (positions T-1 .. T+k-1)
    logits    p_0      p_1   p_2         p_k       p_i judges d_{i+1}; p_k is the bonus
    accept d_1..d_a (the first rejection stops), then emit alt_a: a + 1 new tokens

Greedy rows accept d_i iff it is the argmax, and alt is the argmax: the output equals
plain greedy decoding token for token. Sampled rows follow the standard rejection rule for
a deterministic drafter (a point-mass draft distribution q = one-hot(d): prompt lookup, and
the draft model, which proposes its argmax even for sampled requests; either way d is a
function of the committed tokens, never of this rule's draws): accept d_{i+1} with probability
p_i(d_{i+1}); on rejection draw from p_i with d_{i+1} removed and renormalised; after k
acceptances draw the bonus from p_k. Each emitted token is then distributed exactly as in
plain sampling. p_i is the filtered, temperature-scaled distribution plain sampling uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxkv.samplers import filter_logits
from mlxkv.sampling import SamplingParams


@dataclass(slots=True)
class DraftRows:
    """One speculating sequence's share of the verification."""

    params: SamplingParams
    seed: int
    step: int  # tokens generated before this step (keys the random draws)
    drafts: list[int]


def rejection_sample(probs: mx.array, drafts: mx.array, key: mx.array):
    """The rejection rule over a batch of sequences with k drafts each.

    Args:
        probs: [B, k + 1, V] target probabilities (rows sum to 1).
        drafts: [B, k] int draft tokens.
        key: PRNG key for the uniform draws and the residual / bonus samples.
    Returns:
        (accept [B, k] bool, alt [B, k + 1] int32): accept[b, i] says whether d_{i+1}
        passes (meaningful up to the first False); alt[b, i] is the token emitted when
        the first rejection is at i (i < k), alt[b, k] the bonus after k acceptances.
    """
    B, K1, V = probs.shape
    k_uniform, k_alt = mx.random.split(key)
    p_draft = mx.take_along_axis(probs[:, : K1 - 1], drafts[..., None], axis=-1)[..., 0]
    accept = mx.random.uniform(shape=p_draft.shape, key=k_uniform) < p_draft
    is_draft = mx.arange(V) == drafts[..., None]  # [B, k, V]
    residual = mx.where(is_draft, 0.0, probs[:, : K1 - 1])
    dist = mx.concatenate([residual, probs[:, K1 - 1 :]], axis=1)
    alt = mx.random.categorical(mx.log(dist), key=k_alt).astype(mx.int32)
    return accept, alt


def _sampled(logits: mx.array, row: DraftRows):
    probs = mx.stack([mx.softmax(filter_logits(logits[i], row.params))
                      for i in range(logits.shape[0])])
    key = mx.random.key((row.seed * 1_000_003 + row.step) % (1 << 63) ^ 0x5BEC)
    drafts = mx.array(row.drafts, dtype=mx.int32)[None]
    accept, alt = rejection_sample(probs[None], drafts, key)
    return accept[0], alt[0]


def verify(logits: mx.array, rows: Sequence[DraftRows]) -> list[tuple[mx.array, mx.array]]:
    """Lazy (accept, alt) per sequence.

    Args:
        logits: fp32 [sum(len(drafts) + 1), V], the sequences' rows in order.
    Returns:
        Per sequence, accept [k] bool and alt [k + 1] int32 (see `rejection_sample`).
    """
    greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
    out, start = [], 0
    for row in rows:
        k = len(row.drafts)
        if row.params.is_greedy:
            alt = greedy[start : start + k + 1]
            out.append((alt[:k] == mx.array(row.drafts, dtype=mx.int32), alt))
        else:
            out.append(_sampled(logits[start : start + k + 1], row))
        start += k + 1
    return out


def split_and_verify(logits: mx.array, plain_rows: Sequence[int],
                     spec: Sequence[tuple[DraftRows, int]]):
    """Separate a step's logits into plain sampling rows and speculating sequences' rows.

    Args:
        logits: fp32 [num_rows, V] of one forward.
        plain_rows: the rows of plainly sampled sequences.
        spec: per speculating sequence, its DraftRows and its first row (k + 1 rows).
    Returns:
        (logits[plain_rows], the speculating rows' logits in order, the flat list
        [accept_0, alt_0, accept_1, alt_1, ...] of lazy verdicts, see `verify`).
    """
    rows = [i for row, first in spec for i in range(first, first + len(row.drafts) + 1)]
    spec_logits = logits[mx.array(rows)]
    verdicts = verify(spec_logits, [row for row, _ in spec])
    plain = logits[mx.array(list(plain_rows))] if plain_rows else logits[:0]
    return plain, spec_logits, [a for pair in verdicts for a in pair]


def accepted_tokens(drafts: Sequence[int], accept: Sequence[bool],
                    alt: Sequence[int]) -> list[int]:
    """The tokens to emit: the accepted draft prefix, then the correction or bonus token."""
    num_accepted = 0
    while num_accepted < len(drafts) and accept[num_accepted]:
        num_accepted += 1
    return list(drafts[:num_accepted]) + [int(alt[num_accepted])]
