"""Engine test helpers: mlx-lm greedy references and engine builders."""

from __future__ import annotations

import mlx.core as mx

from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.llm import LLM
from mlxkv.sampling import SamplingParams


def mlx_lm_greedy(model, prompt, num_tokens):
    """Greedy continuation and per-step log-softmax rows with mlx-lm's own KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(prompt)[None]
    tokens, logprobs = [], []
    for _ in range(num_tokens):
        logits = model(x, cache=cache)[0, -1].astype(mx.float32)
        logprobs.append(logits - mx.logsumexp(logits))
        tokens.append(int(mx.argmax(logits)))
        x = mx.array([[tokens[-1]]])
    return tokens, logprobs


def make_llm(loaded, num_blocks=None, block_size=16, max_batched=512, max_seqs=32, **cache_kw):
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, **cache_kw),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=max_seqs),
    )
    return LLM(config, loaded=loaded)


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
