"""Helpers for the speculative decoding tests: engines with a chosen drafter."""

from __future__ import annotations

from oracles import make_llm

from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from mlxkv.llm import LLM
from mlxkv.speculative import Speculator

FLAT = ((1, 1.0),)  # a step-time curve on which every row is free: no sizing cut


def spec_llm(model, drafter=None, step_cost=FLAT, k: int = 6, **llm_kw):
    """A tokenizer-less tiny-model LLM whose engine speculates with `drafter` (None: n-gram).

    The default flat step_cost makes every proposed draft verified (no sizing cut)."""
    llm = make_llm(model, **llm_kw)
    config = SpeculativeConfig(method="ngram", step_cost=step_cost,
                               num_speculative_tokens=k)
    llm.engine.speculator = Speculator(config, drafter)
    return llm


def draft_llm(model, draft, layers: int | None = None, draft_cost: float = 0.0,
              step_cost=FLAT, k: int = 6, num_blocks: int = 256,
              max_batched: int = 512, max_seqs: int = 32) -> LLM:
    """A tokenizer-less tiny-model LLM speculating with the draft model `draft` (its first
    `layers` layers), built through the production path (EngineConfig, engine_factory).

    draft_cost 0 and a flat step_cost: every position the draft may propose is verified."""
    spec = SpeculativeConfig("draft", num_speculative_tokens=k, step_cost=step_cost,
                             draft_model="tiny-draft", draft_layers=layers,
                             draft_cost=draft_cost)
    config = EngineConfig(
        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=max_seqs),
        speculative=spec)
    return LLM(config, loaded=(model, None), draft=(draft, None))


def oracle_drafter(continuations, corrupt_every: int = 4):
    """Propose each sequence's known continuation, with every `corrupt_every`-th position
    (by absolute index) replaced: long accepted runs and regular rejections.

    `continuations`: full token lists (prompt + reference output); a sequence drafts from
    the one it is a prefix of (none: no draft).
    """

    def drafter(token_ids, max_drafts):
        n = len(token_ids)
        for full in continuations:
            if full[:n] == list(token_ids):
                drafts = list(full[n : n + max_drafts])
                return [t if (n + j) % corrupt_every else (t + 1) % 500
                        for j, t in enumerate(drafts)]
        return []

    return drafter


class CharTokenizer:
    """Token id i decodes to one letter (a..z): enough for stop strings and EOS."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)
