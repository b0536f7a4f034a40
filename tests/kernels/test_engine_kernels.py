"""The engine's decode step through the kernels (emulated Metal) == the reference path.

`kernel_decode` is what the engine installs on Metal; here its launches run on the C++
emulator, and the KV writes of lattice layers go through the emulated encode kernel. A
counting executor proves the kernels really ran (a dispatcher that silently fell back
would pass a bare comparison).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import mlx.core as mx
import pytest
from harness import emulate

from mlxkv.attention import default_decode_op, kernel_decode
from mlxkv.cache_manager import KVCacheManager
from mlxkv.codec import parse_kv_codec
from mlxkv.config import EngineConfig
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kernels.kv_encode import is_kernel_supported as encode_supported
from mlxkv.kernels.kv_encode import kv_encode_kernel
from mlxkv.kernels.paged_attention_cpu import cpu_decode, is_cpu_kernel_available
from mlxkv.kv_store import KVStore
from mlxkv.models.adapter import group_specs_for
from mlxkv.models.tiny import make_tiny_model
from mlxkv.runner import ModelRunner

PROMPTS = [[(7 * i + 3) % 500 + 1 for i in range(21)], [(3 * i + 2) % 500 + 1 for i in range(9)]]


class Counting:
    """Executor that runs launches on the emulator and counts them by kernel name."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, launch):
        self.calls[launch.spec.name] = self.calls.get(launch.spec.name, 0) + 1
        return emulate(launch)


def emulated_encoder(counter: Counting):
    def encode(*, x, codec):
        if encode_supported(x, codec):
            return kv_encode_kernel(x=x, codec=codec, executor=counter)
        return codec.encode(x)

    return encode


def run_steps(model, spec: str, counter: Counting | None, decode_steps=3, block_size=16,
              decode_op=None):
    """Prefill two prompts, then decode greedily in one batch; logits of every step.

    The decode op is kernel_decode on `counter` when one is given, else `decode_op`."""
    groups = group_specs_for(model)
    codecs = parse_kv_codec(spec, len(model.layers))
    kw = {} if counter is None else {"encoder": emulated_encoder(counter)}
    store = KVStore(groups, [24] * len(groups), block_size, mx.float32, codecs, **kw)
    cache = KVCacheManager(groups, [24] * len(groups), block_size)
    op = decode_op if counter is None else partial(kernel_decode, executor=counter)
    runner = ModelRunner(model, store, op)
    seqs = {f"s{i}": list(p) for i, p in enumerate(PROMPTS)}
    done = dict.fromkeys(seqs, 0)
    steps = []
    for step in range(decode_steps + 1):
        entries = []
        for rid, toks in seqs.items():
            if step == 0:
                cache.lookup(rid, toks)
            n = len(toks) - done[rid]
            cache.allocate_slots(rid, n)
            entries.append(SeqEntry(toks[done[rid]:], done[rid],
                                    cache.slot_mapping(rid, done[rid], len(toks)),
                                    cache.block_tables(rid)))
        logits = runner.forward(build_batch(entries))
        mx.eval(logits, store.arrays())
        steps.append(logits)
        for i, rid in enumerate(seqs):
            done[rid] = len(seqs[rid])
            seqs[rid].append(int(mx.argmax(logits[i])))
    return steps, seqs


@pytest.mark.parametrize(("arch", "spec", "tol"), [
    ("llama", "fp32", 1e-4),
    ("llama", "int8", 1e-4),
    ("llama", "e8:k4v3", 1e-4),
    ("gemma3_text", "d4:k4v3", 1e-4),   # sliding-window layers + a lattice codec
])
def test_decode_steps_through_kernels_match_reference(arch, spec, tol):
    model = make_tiny_model(arch, head_dim=64, num_attention_heads=6, num_key_value_heads=2,
                            hidden_size=128)
    ref_steps, ref_tokens = run_steps(model, spec, None)
    counter = Counting()
    got_steps, got_tokens = run_steps(model, spec, counter)
    layers = len(model.layers)
    assert counter.calls.get(
        "mlxkv_paged_attention" if spec == "fp32" else "mlxkv_paged_attention_quant"
    ) == 3 * layers  # every layer of every decode step, none of the prefill
    if spec.startswith(("e8", "d4")):
        assert counter.calls["mlxkv_kv_encode"] >= 2 * 4 * layers  # K and V, every step
    for ref, got in zip(ref_steps, got_steps, strict=True):
        rel = float(mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref)))
        assert rel < tol
    assert got_tokens == ref_tokens


def test_mixed_batch_decode_rows_use_the_kernel():
    """A decode row next to a prefill chunk goes through the kernel too (single row)."""
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    groups = group_specs_for(model)
    outs = []
    for counter in (None, Counting()):
        store = KVStore(groups, [16], 16, mx.float32)
        cache = KVCacheManager(groups, [16], 16)
        op = None if counter is None else partial(kernel_decode, executor=counter)
        runner = ModelRunner(model, store, op)
        a, b = PROMPTS
        for rid, toks in (("a", a), ("b", b)):
            cache.lookup(rid, toks)
        cache.allocate_slots("a", len(a))
        mx.eval(runner.forward(build_batch([SeqEntry(a, 0, cache.slot_mapping("a", 0, len(a)),
                                                     cache.block_tables("a"))])))
        cache.allocate_slots("a", 1)
        cache.allocate_slots("b", len(b))
        batch = build_batch([
            SeqEntry([5], len(a), cache.slot_mapping("a", len(a), len(a) + 1),
                     cache.block_tables("a")),
            SeqEntry(b, 0, cache.slot_mapping("b", 0, len(b)), cache.block_tables("b"))])
        outs.append(runner.forward(batch))
        if counter is not None:
            assert counter.calls == {"mlxkv_paged_attention": len(model.layers)}
    assert float(mx.max(mx.abs(outs[0] - outs[1]))) < 1e-4


def test_default_decode_op_follows_the_backend_and_the_device():
    assert default_decode_op("reference") is None
    cpu = cpu_decode if is_cpu_kernel_available() else None
    expected = kernel_decode if mx.metal.is_available() else cpu
    assert default_decode_op("auto") is expected
    with pytest.raises(ValueError):
        default_decode_op("cuda")
    with pytest.raises(ValueError):
        EngineConfig(attention="fast")


def test_unsupported_layers_fall_back_to_the_reference():
    """head_dim 16 (no kernel instance) and the Lloyd codec: kernel_decode declines."""
    small = make_tiny_model("llama")  # head_dim 16
    counter = Counting()
    ref, _ = run_steps(small, "fp32", None, decode_steps=1)
    got, _ = run_steps(small, "fp32", counter, decode_steps=1)
    assert counter.calls == {}
    assert float(mx.max(mx.abs(got[-1] - ref[-1]))) == 0.0
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    counter = Counting()
    run_steps(model, "lloyd:k4v4", counter, decode_steps=1)
    assert counter.calls == {}


def test_smollm2_greedy_text_identical_through_emulated_kernels(smollm2_dir):
    """The real model: the engine with kernel_decode (emulated) writes the same text."""
    from mlxkv.config import CacheConfig
    from mlxkv.llm import LLM
    from mlxkv.models.loader import load_model
    from mlxkv.sampling import SamplingParams

    loaded = load_model(str(smollm2_dir), progress=False)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "Three primary colours are"]
    texts, counter = [], Counting()
    for op in (None, partial(kernel_decode, executor=counter)):
        llm = LLM(EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64)), loaded=loaded)
        llm.engine.runner.decode_op = op
        texts.append([o["text"] for o in llm.generate(prompts, params)])
    assert counter.calls["mlxkv_paged_attention"] == 4 * 30  # 4 decode steps x 30 layers
    assert texts[0] == texts[1]


def test_engine_installs_kernel_decode_when_metal_is_available(monkeypatch):
    """The engine's wiring: Metal present -> kernel_decode; MLXKV_ATTENTION=reference -> None."""
    import mlxkv.attention as attention
    from mlxkv.config import CacheConfig
    from mlxkv.engine import LLMEngine

    monkeypatch.setattr(attention, "is_metal_available", lambda: True)
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                            hidden_size=128)
    cache = CacheConfig(block_size=16, num_blocks=8)
    for env, verbose, expected in (("auto", False, "kernel"), ("auto", True, "verbose"),
                                   ("reference", False, None)):
        monkeypatch.setenv("MLXKV_ATTENTION", env)
        monkeypatch.setenv("MLXKV_KERNEL_VERBOSE", "1" if verbose else "0")
        monkeypatch.setenv("MLXKV_KERNEL_SELFCHECK", "0")  # no real Metal to check here
        cfg = replace(EngineConfig.from_env(), cache=cache)
        engine = LLMEngine.from_config(cfg, loaded=(model, None))
        assert engine.runner.decode_op is (None if expected is None else engine.kernels)
        op = engine.kernels.backend.decode_op  # what the guard (selfcheck.py) calls
        if expected is None:
            assert op is None
        elif expected == "kernel":
            assert op is kernel_decode
        else:
            assert op.func is kernel_decode and op.keywords["executor"].keywords == {
                "verbose": True}
