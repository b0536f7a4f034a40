"""SmolLM2 (real weights) with the compiled small-M linear vs MLX's matmul (MLXKV_LINEAR).

Same engine, same attention backend, only the linear layers differ: greedy ids must be
identical and every step's fp32 logits within the oracles' ATOL. A spy counts the
primitive's calls and their row counts, so a routing that silently fell back would fail.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.nn as nn
from oracles import assert_same, run

from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.kernels import linear_cpu
from mlxkv.llm import LLM
from mlxkv.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _llm(loaded, linear: str) -> LLM:
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=256))
    return LLM(replace(config, linear=linear), loaded=loaded)


def test_smollm2_primitive_vs_reference_linear(smollm2, monkeypatch):
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is",
                                       "Write a haiku about the sea. " * 4,
                                       "List three prime numbers:")]
    rows: list[int] = []
    real = linear_cpu.linear_primitive()

    def spy(x, w, b):
        rows.append(x.size // x.shape[-1])
        return real(x, w, b)

    monkeypatch.setattr(linear_cpu, "linear_primitive", lambda: spy)
    fast = _llm(smollm2, "auto")
    assert fast.engine.cache_stats()["linear"] == {
        "backend": "cpu-ext", "max_rows": linear_cpu.MAX_ROWS, "routed_layers": 30 * 7 + 1,
        "reason": ""}
    got = run(fast, prompts, PARAMS)
    ref = run(_llm(smollm2, "reference"), prompts, PARAMS)
    for rid in ref:
        assert_same(got[rid], ref[rid], f"linear primitive vs MLX matmul, {rid}")
    # The prefill step (40 rows: MLX's matmul in the layers) samples 3 rows through the
    # routed lm_head; then 11 decode steps of 3 rows through all 211 linears.
    assert rows == [3] * (1 + 11 * 211)
    # mlx-lm's own model object still runs nn.Linear (its oracles keep MLX's matmul).
    assert type(smollm2.model.model.layers[0].mlp.gate_proj) is nn.Linear
