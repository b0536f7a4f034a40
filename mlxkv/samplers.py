"""Pure-mx samplers: one row of logits per request, each with its own SamplingParams.

Reproducibility: a request's random key at its k-th generated token is derived from
(seed, k) only, so the same seed gives the same tokens whatever else is in the batch.
Logprobs are log-softmax of the raw model logits (before penalties and temperature), the
convention of mlx-lm and the OpenAI API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxkv.sampling import SamplingParams


@dataclass(slots=True)
class SampleRow:
    """What sampling one row needs besides the logits."""

    params: SamplingParams
    seed: int
    step: int  # number of tokens generated so far
    context_ids: Sequence[int]  # prompt + output (for the repetition penalty)
    output_ids: Sequence[int]  # output only (presence / frequency penalties)


def apply_penalties(logits: mx.array, row: SampleRow) -> mx.array:
    """logits [V] with repetition, presence and frequency penalties applied."""
    p = row.params
    if p.repetition_penalty != 1.0 and row.context_ids:
        ids = mx.array(sorted(set(row.context_ids)), dtype=mx.int32)
        sel = logits[ids]
        sel = mx.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        logits[ids] = sel
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts: dict[int, int] = {}
        for t in row.output_ids:
            counts[t] = counts.get(t, 0) + 1
        ids = mx.array(list(counts), dtype=mx.int32)
        freq = mx.array(list(counts.values()), dtype=logits.dtype)
        logits[ids] = logits[ids] - p.presence_penalty - p.frequency_penalty * freq
    return logits


def filter_logits(logits: mx.array, p: SamplingParams) -> mx.array:
    """Temperature-scaled logits [V] with top-k, top-p and min-p applied (-inf outside)."""
    logits = logits / p.temperature
    neg = mx.array(-float("inf"), dtype=logits.dtype)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-p.top_k]
        logits = mx.where(logits < kth, neg, logits)
    if p.min_p > 0.0:
        probs = mx.softmax(logits)
        logits = mx.where(probs < p.min_p * probs.max(), neg, logits)
    if p.top_p < 1.0:
        order = mx.argsort(-logits)
        probs = mx.softmax(logits[order])
        cum = mx.cumsum(probs) - probs  # mass strictly before each token
        keep_sorted = cum < p.top_p
        keep = mx.zeros(logits.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        logits = mx.where(keep, logits, neg)
    return logits


def _sample_row(logits: mx.array, row: SampleRow) -> mx.array:
    p = row.params
    logits = apply_penalties(logits, row)
    if p.is_greedy:
        return mx.argmax(logits)
    key = mx.random.key((row.seed * 1_000_003 + row.step) % (1 << 63))
    return mx.random.categorical(filter_logits(logits, p), key=key)


def sample(logits: mx.array, rows: Sequence[SampleRow],
           process: Callable[[mx.array], mx.array] | None = None):
    """Sample one token per row.

    Args:
        logits: fp32 [S, V], row i for rows[i].
        process: a logits processor applied before sampling (structured-output masks);
            logprobs stay those of the raw `logits`.
    Returns:
        (token_ids [S] int32, logprobs [S, V] or None when no row asks for logprobs).
    """
    raw = logits
    if process is not None:
        logits = process(logits)
    plain = all(r.params.is_greedy and r.params.repetition_penalty == 1.0
                and not r.params.presence_penalty and not r.params.frequency_penalty
                for r in rows)
    if plain:
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    else:
        tokens = mx.stack([_sample_row(logits[i], r) for i, r in enumerate(rows)])
        tokens = tokens.astype(mx.int32)
    logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
    return tokens, logprobs
