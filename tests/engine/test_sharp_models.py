"""The tiny models are sharp: their next token depends on which (distant) K/V they read.

This is what makes the logit oracles (tests/oracles.py) able to fail; see mlxkv/models/tiny.py.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

from mlxkv.models.tiny import TINY_CONFIGS, make_tiny_model

PROMPT = [(7 * i + 3) % 500 + 1 for i in range(37)]


def last_logits(model, ids):
    return model(mx.array(ids)[None])[0, -1]


def greedy(model, ids, n=8):
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(mx.argmax(last_logits(model, ids))))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_context_decides_the_continuation(arch):
    model = make_tiny_model(arch)
    shuffled = PROMPT[:-1]
    random.Random(0).shuffle(shuffled)
    shuffled.append(PROMPT[-1])  # same last token, same multiset of context tokens
    base, other = greedy(model, PROMPT), greedy(model, shuffled)
    assert base != other
    assert len(set(base)) >= 3, f"greedy output echoes itself: {base}"


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_the_first_token_moves_the_last_logits(arch):
    """36 positions back: a wrong key that far away shifts the logits by whole units."""
    model = make_tiny_model(arch)
    changed = [PROMPT[0] + 1] + PROMPT[1:]
    diff = mx.abs(last_logits(model, changed) - last_logits(model, PROMPT)).max().item()
    assert diff > 1.0

