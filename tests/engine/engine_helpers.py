"""Engine test helpers: mlx-lm greedy references and engine builders."""

from __future__ import annotations

import mlx.core as mx
from oracles import greedy_cache_loop, llm_for

from mlxkv.sampling import SamplingParams


def mlx_lm_greedy(model, prompt, num_tokens):
    """Greedy continuation and per-step log-softmax rows with mlx-lm's own KV cache."""
    trace = greedy_cache_loop(model, prompt, num_tokens)
    logits = mx.array(trace.logits)
    return trace.token_ids, list(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def make_llm(loaded, num_blocks=None, block_size=16, max_batched=512, max_seqs=32, **cache_kw):
    """An LLM over `loaded` (model, tokenizer): the pool sized from memory by default."""
    return llm_for(loaded, num_blocks, block_size, max_batched, max_seqs, **cache_kw)


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
