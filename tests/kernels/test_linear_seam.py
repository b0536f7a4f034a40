"""The engine's routed view of a model (models/linear_seam.py) and its engine wiring."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxkv.config import EngineConfig
from mlxkv.kernels import linear_cpu
from mlxkv.models.linear_seam import RoutedEmbedding, RoutedLinear, route_linears, select_linear
from mlxkv.models.tiny import make_tiny_model


def _layers(model, cls):
    return [name for name, m in model.named_modules() if type(m) is cls]


def _spy():
    calls = []

    def op(x, w, b):
        calls.append(x.shape)
        return linear_cpu.linear_cpu_kernel(x, w, b)

    return op, calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_view_routes_every_fp32_linear_and_leaves_the_model_alone(arch):
    model = make_tiny_model(arch)
    linears = _layers(model, nn.Linear)
    embeddings = _layers(model, nn.Embedding)
    op, _ = _spy()
    view, count = route_linears(model, op, max_rows=4)
    assert count == len(linears) + len(embeddings) > 0
    assert _layers(model, nn.Linear) == linears  # the model is not modified
    assert sorted(_layers(view, RoutedLinear)) == sorted(linears)
    assert sorted(_layers(view, RoutedEmbedding)) == sorted(embeddings)
    # The same weight arrays, not copies.
    mine = dict(tree_flatten(model.parameters()))
    theirs = dict(tree_flatten(view.parameters()))
    assert mine.keys() == theirs.keys() and all(theirs[k] is mine[k] for k in mine)


def test_routed_calls_go_to_the_op_only_for_few_rows():
    model = make_tiny_model("qwen2")  # q/k/v projections with bias
    op, calls = _spy()
    view, _ = route_linears(model, op, max_rows=4)
    layer, orig = view.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert "bias" in layer
    few, many = mx.random.normal((4, 1, 64)), mx.random.normal((5, 1, 64))
    assert mx.allclose(layer(few), orig(few), atol=1e-5).item() and calls == [(4, 1, 64)]
    assert mx.array_equal(layer(many), orig(many)).item() and len(calls) == 1
    emb = view.model.embed_tokens
    h = mx.random.normal((2, 64))
    assert mx.allclose(emb.as_linear(h), model.model.embed_tokens.as_linear(h),
                       atol=1e-5).item() and len(calls) == 2
    assert mx.array_equal(emb(mx.array([3, 7])), model.model.embed_tokens(mx.array([3, 7])))


def test_quantized_and_half_layers_are_not_routed():
    model = make_tiny_model("llama")
    nn.quantize(model, group_size=32, bits=8)
    assert route_linears(model, _spy()[0], 4)[1] == 0
    half = make_tiny_model("llama")
    half.set_dtype(mx.float16)
    view, routing = select_linear(half, "auto")
    assert view is half and routing.backend == "reference"


def test_select_linear_modes():
    model = make_tiny_model("llama")
    view, routing = select_linear(model, "auto")
    assert routing.backend == "cpu-ext" and routing.max_rows == linear_cpu.MAX_ROWS
    assert view is not model and routing.routed_layers == len(_layers(model, nn.Linear)) + 1
    view, routing = select_linear(model, "reference")
    assert view is model and routing.backend == "reference"


def test_engine_reports_and_honours_the_linear_backend(monkeypatch):
    from mlxkv.llm import LLM

    model = make_tiny_model("llama")
    op, calls = _spy()
    monkeypatch.setattr(linear_cpu, "linear_primitive", lambda: op)
    llm = LLM(EngineConfig(), loaded=(model, None))
    assert llm.engine.cache_stats()["linear"]["backend"] == "cpu-ext"
    llm.engine.add_request("a", list(range(1, 40)), _greedy(3))
    while llm.engine.has_unfinished():
        llm.engine.step()
    rows = [s[0] for s in calls]
    # The prefill step (39 rows: MLX's matmul) samples one row: its lm_head is routed; then
    # 2 decode steps of 1 row through 3 layers x 7 linears + the lm_head.
    assert max(rows) == 1 and len(rows) == 1 + 2 * (3 * 7 + 1)
    monkeypatch.setenv("MLXKV_LINEAR", "reference")
    ref = LLM(EngineConfig.from_env(), loaded=(model, None))
    assert ref.engine.cache_stats()["linear"]["backend"] == "reference"
    assert ref.engine.runner.net is model


def test_config_rejects_an_unknown_linear_backend():
    with pytest.raises(ValueError, match="linear"):
        EngineConfig(linear="fast")


def _greedy(n):
    from mlxkv.sampling import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
