"""Generate offline with the paged engine: a batch of prompts, prefix sharing, compressed KV.

    python examples/offline_generate.py
"""

import mlxkv  # noqa: F401  (loads OpenBLAS before mlx on Linux)
from mlxkv.config import CacheConfig, EngineConfig
from mlxkv.llm import LLM
from mlxkv.sampling import SamplingParams

llm = LLM(EngineConfig(cache=CacheConfig(kv_codec="e8:k4v3")))  # lattice-compressed KV blocks
system = "You are a helpful assistant. Answer in one sentence. "
prompts = [
    llm.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": q}],
        add_generation_prompt=True)
    for q in ("What is the capital of France?", "What is 2 + 2?", "Name a planet.")
]
outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
for out in outs:
    print(repr(out["text"]), "cached prompt tokens:", out["num_cached_tokens"])
print(llm.engine.cache_stats()["hit_rate"])
