"""Start-up self-check and runtime guard (mlxkv/kernels/selfcheck.py) on a fake accelerator.

The fake backend runs the real Metal bodies on the C++ emulator, through the engine's own
wiring (`detect_backend` is the only thing replaced). Three injected faults, a compile
failure, a launch exception in the middle of serving and a wrong result (a planted
off-by-one in the body), must each leave the engine serving the reference's tokens with the
reference's logits, and say so in its report.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from harness import emulate
from oracles import run

import mlxkv.kernels.selfcheck as selfcheck
from mlxkv.attention import kernel_decode
from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.llm import LLM
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams

PROMPTS = [[(7 * i + 3) % 500 + 1 for i in range(21)], [(3 * i + 2) % 500 + 1 for i in range(9)]]
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
ATTN = "mlxkv_paged_attention"
COMPILE_ERROR = ("[metal::Device] Unable to build metal library from source\n"
                 "program_source:41:5: error: use of undeclared identifier 'simd_sum2'")


class FakeDevice:
    """Executor: the emulator, with a fault injected into launches of kernel `target`."""

    def __init__(self, fault: str | None = None, target: str = ATTN, after: int = 0):
        self.fault, self.target, self.after = fault, target, after
        self.calls: dict[str, int] = {}

    def __call__(self, launch):
        name = launch.spec.name
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self.target and self.calls[name] > self.after:
            if self.fault == "compile":
                raise RuntimeError(COMPILE_ERROR)
            if self.fault == "launch":
                raise RuntimeError("[metal::Device] command buffer failed: launch timeout")
            if self.fault == "wrong":  # the planted bug of test_harness: one key too many
                body = launch.spec.source.replace("j < end;", "j <= end;")
                assert body != launch.spec.source
                launch = dataclasses.replace(launch, spec=dataclasses.replace(
                    launch.spec, source=body))
        return emulate(launch)


def fake_backend(monkeypatch, device: FakeDevice) -> None:
    backend = selfcheck.Backend("fake", partial(kernel_decode, executor=device),
                                selfcheck.kernel_encoder(device), is_accelerator=True)
    monkeypatch.setattr(selfcheck, "detect_backend", lambda *a, **k: backend)


def serve(model, spec: str = "fp32", attention: str = "auto"):
    """(traces by request, engine) after serving PROMPTS greedily to the end."""
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=24, kv_codec=spec),
                          scheduler=SchedulerConfig(max_num_seqs=4), attention=attention)
    llm = LLM(config, loaded=(model, None))
    return run(llm, PROMPTS, PARAMS), llm.engine


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                           hidden_size=128)


def assert_same_logits(got, ref, atol: float) -> None:
    for rid, trace in ref.items():
        assert got[rid].token_ids == trace.token_ids, rid
        np.testing.assert_allclose(got[rid].logits, trace.logits, rtol=0, atol=atol)


@pytest.mark.parametrize("spec", ["fp32", "int8", "e8:k4v3"])
def test_healthy_kernels_pass_the_selfcheck_and_serve(monkeypatch, model, spec):
    ref, _ = serve(model, spec, attention="reference")
    device = FakeDevice()
    fake_backend(monkeypatch, device)
    got, engine = serve(model, spec)
    report = engine.cache_stats()["attention"]
    assert report["backend"] == "fake" and report["selfcheck_ms"] is not None
    assert report["kernels"] and all(k["state"] == "ok" for k in report["kernels"].values())
    if spec.startswith("e8"):
        assert "encode e8m4 d64" in report["kernels"] and device.calls["mlxkv_kv_encode"] > 4
    attn = ATTN if spec == "fp32" else "mlxkv_paged_attention_quant"
    # self-check: unsplit + split (which adds the combine); serving: 3 steps x 2 layers
    assert device.calls[attn] == 2 + 3 * len(model.layers)
    assert device.calls["mlxkv_paged_attention_combine"] >= 1
    assert_same_logits(got, ref, atol=1e-3)


@pytest.mark.parametrize("fault", ["compile", "wrong"])
def test_a_kernel_failing_its_selfcheck_is_disabled(monkeypatch, model, caplog, fault):
    ref, _ = serve(model, attention="reference")
    device = FakeDevice(fault)
    fake_backend(monkeypatch, device)
    got, engine = serve(model)
    report = engine.cache_stats()["attention"]
    (status,) = report["kernels"].values()
    assert status["state"] == "disabled" and report["backend"] == "reference"
    assert ("Unable to build metal library" if fault == "compile" else "mismatch") \
        in status["reason"]
    assert device.calls[ATTN] == 1  # the self-check only; serving never launched it
    warnings = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert_same_logits(got, ref, atol=0.0)  # the reference path itself


def test_a_launch_exception_while_serving_falls_back_and_fails_no_request(monkeypatch, model):
    ref, _ = serve(model, attention="reference")
    device = FakeDevice("launch", after=2 + len(model.layers))  # self-check + one decode step
    fake_backend(monkeypatch, device)
    got, engine = serve(model)  # run() asserts that no request finished with an error
    (status,) = engine.cache_stats()["attention"]["kernels"].values()
    assert status["state"] == "disabled" and "launch error" in status["reason"]
    assert device.calls[ATTN] == 2 + len(model.layers) + 1  # the failed launch, then none
    assert_same_logits(got, ref, atol=1e-3)


def test_the_flag_skips_the_selfcheck(monkeypatch, model):
    device = FakeDevice()
    fake_backend(monkeypatch, device)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=24),
                          kernel_selfcheck=False)
    engine = LLM(config, loaded=(model, None)).engine
    assert device.calls == {} and engine.cache_stats()["attention"]["selfcheck_ms"] is None


def test_the_reference_backend_reports_itself(model):
    _, engine = serve(model, attention="reference")
    report = engine.cache_stats()["attention"]
    assert report == {"backend": "reference", "device_backend": "reference",
                      "selfcheck_ms": None, "kernels": {}}
    assert engine.runner.decode_op is None


def test_reference_decode_is_the_attention_oracle():
    """The self-check's twin agrees with the kernels' reference on a planted table."""
    from mlxkv.kernels.paged_attention import paged_attention_ref
    from mlxkv.kv_spec import KVGroupSpec
    from mlxkv.kv_store import KVStore

    store = KVStore([KVGroupSpec((0,), 2, 64)], [6], 16, mx.float32)
    store.write(0, mx.arange(16, 96), mx.random.normal((80, 2, 64)), mx.random.normal((80, 2, 64)))
    q = mx.random.normal((2, 4, 64))
    tables, lens = mx.array([[3, 1, 2], [4, 5, 0]]), mx.array([40, 17])
    got = selfcheck.reference_decode(q, store, 0, tables, lens, 0.125, 20)
    want = paged_attention_ref(queries=q, k_pool=store.k_pool(0)["x"], v_pool=store.v_pool(0)["x"],
                               block_tables=tables, seq_lens=lens, scale=0.125, sliding_window=20)
    assert mx.allclose(got, want, atol=1e-5).item()


class StatsOnly:
    """The part of the engine client /health, /metrics and /v1/cache/stats read."""

    model_name, max_model_len, tokenizer = "tiny", 64, None

    def __init__(self, stats: dict):
        self.stats = stats

    def is_healthy(self) -> bool:
        return True

    def cache_stats(self) -> dict:
        return self.stats

    def metrics(self) -> dict:
        return {}


def test_health_stats_and_metrics_name_the_backend_and_the_disabled_kernel(monkeypatch, model):
    from fastapi.testclient import TestClient

    from server.app import create_app

    fake_backend(monkeypatch, FakeDevice("compile"))
    _, engine = serve(model)
    client = TestClient(create_app(StatsOnly(engine.cache_stats())))
    key = "decode fp32/fp32 d64 kvh2"
    linear = engine.cache_stats()["linear"]["backend"]
    assert client.get("/health").json() == {"status": "ok", "attention_backend": "reference",
                                            "linear_backend": linear,
                                            "disabled_kernels": [key]}
    stats = client.get("/v1/cache/stats").json()["attention"]
    assert stats["device_backend"] == "fake" and stats["kernels"][key]["state"] == "disabled"
    metrics = client.get("/metrics").text
    assert 'mlxkv_attention_backend_info{backend="reference"} 1' in metrics
    assert f'mlxkv_linear_backend_info{{backend="{linear}"}} 1' in metrics
    assert f'mlxkv_kernel_enabled{{kernel="{key}",state="disabled"}} 0' in metrics


def test_without_the_extension_the_cpu_reports_the_reference(monkeypatch, model):
    import mlxkv.attention as attention

    monkeypatch.setattr(attention, "is_cpu_kernel_available", lambda: False)
    assert selfcheck.detect_backend("auto").name == "reference"
    _, engine = serve(model)
    assert engine.cache_stats()["attention"]["backend"] == "reference"
    monkeypatch.setattr(attention, "is_cpu_kernel_available", lambda: True)
    assert selfcheck.detect_backend("auto").name == "cpu-ext"
    assert selfcheck.detect_backend("reference").name == "reference"


def test_a_missing_extension_warns_once_and_both_paths_fall_back(monkeypatch, caplog):
    """No mlxkv._ext at all (a failed build): one warning line names both fallbacks, the
    attention and linear loaders answer None, and the CPU backend reports the reference."""
    import logging
    import sys

    from mlxkv.kernels import linear_cpu, paged_attention_cpu

    monkeypatch.setitem(sys.modules, "mlxkv._ext", None)  # import now raises ImportError
    for loader in (paged_attention_cpu._load_ext, linear_cpu._load_ext):
        loader.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG):
            assert not paged_attention_cpu.is_cpu_kernel_available()
            assert not linear_cpu.is_linear_kernel_available()
            assert linear_cpu.linear_primitive() is None
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        text = warnings[0].getMessage()
        assert "reference path" in text and "linear layers" in text
        if not mx.metal.is_available():
            assert selfcheck.detect_backend("auto").name == "reference"
    finally:
        for loader in (paged_attention_cpu._load_ext, linear_cpu._load_ext):
            loader.cache_clear()
