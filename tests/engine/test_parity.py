"""Parity of the paged engine with mlx-lm (fp32, CPU): tiny architectures and real models."""

from __future__ import annotations

import mlx.core as mx
import pytest
from engine_helpers import make_llm, mlx_lm_greedy
from oracles import engine_vs_mlx_lm

from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams

PROMPT = [(7 * i + 3) % 500 + 1 for i in range(37)]

_PRIMITIVES = ("paged_decode_attention", "paged_decode_attention_packed",
               "paged_prefill_attention_packed")


@pytest.fixture
def primitive_calls(monkeypatch):
    """Counts calls of the compiled CPU attention (mlxkv._ext) by entry point, so a parity
    test proves the kernel ran instead of passing on a silent reference fallback."""
    if mx.metal.is_available():
        pytest.skip("Metal present: the engine runs the Metal kernels, not the CPU primitive")
    from mlxkv.kernels.paged_attention_cpu import _load_ext

    ext = _load_ext()
    assert ext is not None, "the compiled CPU extension must be built (pip install -e .)"
    calls = dict.fromkeys(_PRIMITIVES, 0)

    def counting(name, fn):
        def counted(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return counted

    for name in _PRIMITIVES:
        monkeypatch.setattr(ext, name, counting(name, getattr(ext, name)))
    return calls


def _assert_kernel_ran(llm, calls, layers: int) -> None:
    assert llm.engine.cache_stats()["attention"]["backend"] == "cpu-ext"
    assert calls["paged_prefill_attention_packed"] >= layers  # the prompt's chunks
    decode = calls["paged_decode_attention"] + calls["paged_decode_attention_packed"]
    assert decode >= layers  # and decode steps


def test_gemma3_tiny_sliding_window_long_context():
    """Window 8, block 4: most blocks leave the window; prefill in chunks of 16."""
    engine_vs_mlx_lm(make_tiny_model("gemma3_text"), PROMPT * 2, steps=10, max_batched=16)


def test_seeded_sampling_reproducible_across_batches():
    model = make_tiny_model("qwen2")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = make_llm((model, None)).generate([PROMPT], params)[0]["token_ids"]
    other = SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    llm = make_llm((model, None), block_size=4)
    llm.engine.add_request("x", PROMPT[:11], other)
    batched = llm.generate([PROMPT, PROMPT[3:]], params)[0]["token_ids"]
    assert batched == alone
    assert make_llm((model, None)).generate([PROMPT], params)[0]["token_ids"] == alone


def test_logprobs_match_mlx_lm():
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    out = make_llm((model, None)).generate([PROMPT], params)[0]
    ref_tokens, ref_lp = mlx_lm_greedy(model, PROMPT, 6)
    assert out["token_ids"] == ref_tokens
    for lp, ref_row, tok in zip(out["logprobs"], ref_lp, ref_tokens, strict=True):
        assert lp.token_id == tok
        assert abs(lp.logprob - ref_row[tok].item()) < 1e-4
        top = sorted(lp.top.items(), key=lambda kv: -kv[1])
        assert top[0][0] == tok and len(top) == 3


def test_smollm2_greedy_matches_mlx_lm_generate(smollm2, primitive_calls):
    from mlx_lm import stream_generate

    prompt = "The capital of France is"
    llm = make_llm(smollm2)
    got = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0))[0]
    _assert_kernel_ran(llm, primitive_calls, len(smollm2.model.layers))
    ref = [r.token for r in stream_generate(smollm2.model, smollm2.tokenizer, prompt,
                                            max_tokens=20)]
    assert got["token_ids"] == ref
    # mlx-lm's streaming detokenizer drops the first token's leading space; we keep it
    assert got["text"] == smollm2.tokenizer.decode(ref)
    assert got["text"].startswith(" Paris")


def test_smollm2_batch_and_prefix_parity(smollm2):
    tok = smollm2.tokenizer
    system = "You are a helpful assistant who answers briefly and precisely. " * 3
    prompts = [tok.encode(system + q) for q in ("What is 2+2?", "Name a color.", "Hi")]
    llm = make_llm(smollm2)
    refs = [mlx_lm_greedy(smollm2.model, p, 8)[0] for p in prompts]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o["token_ids"] for o in outs] == refs
    again = llm.generate(prompts[:1], params)[0]
    assert again["token_ids"] == refs[0] and again["num_cached_tokens"] > 0


def test_gemma3_past_sliding_window_matches_mlx_lm(gemma3, primitive_calls):
    tok = gemma3.tokenizer
    text = " ".join(f"word{i % 37} is number {i}." for i in range(140))
    prompt = tok.encode(text)
    assert len(prompt) > 600
    llm = make_llm(gemma3, max_batched=256)
    got = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                ignore_eos=True))[0]["token_ids"]
    _assert_kernel_ran(llm, primitive_calls, len(gemma3.model.layers))
    assert got == mlx_lm_greedy(gemma3.model, prompt, 6)[0]


def test_n_forks_share_prompt_blocks_and_finish():
    model = make_tiny_model("llama")
    llm = make_llm((model, None), block_size=4)
    engine = llm.engine
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=4))
    engine.step()  # prefill + fork
    tables = [engine.cache.block_tables(r.request_id)[0] for r in engine.scheduler.running]
    assert len(tables) == 3 and tables[0][:9] == tables[1][:9] == tables[2][:9]
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    finished = sorted(o.index for o in outs if o.finished)
    assert finished == [0, 1, 2]
    engine.cache.check_invariants()
    assert engine.cache_stats()["blocks_used"] == 0 and engine.cache_stats()["num_requests"] == 0
