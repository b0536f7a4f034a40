"""The engine's view of an mlx-lm model whose decode-shaped matmuls run a custom linear.

`route_linears(model, op, max_rows)` returns a view of the model: a shallow copy of the
module tree in which every plain `nn.Linear` with a float32 weight is a `RoutedLinear`
and every plain float32 `nn.Embedding` a `RoutedEmbedding` (whose `as_linear` is the tied
lm_head). The view shares every weight array with the model (no weight is copied) and
modules with nothing to route are shared, not copied.

Invariants:
  * The model passed in is never modified: mlx-lm code holding it (its generate loops,
    the benchmarks' dense side, the parity tests' oracle) keeps MLX's matmul.
  * A routed call computes `op(x, W, b)` when x is float32 with at most `max_rows` rows
    (x.size / K), else the layer's own nn path, so prefill keeps MLX's sgemm.
  * Quantized layers (QuantizedLinear, QuantizedEmbedding) and non-fp32 weights are left
    as they are.
  * Weights loaded into the model after routing are not seen by the view's routed layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

LinearOp = Callable[[mx.array, mx.array, mx.array | None], mx.array]


class RoutedLinear(nn.Linear):
    """nn.Linear over the same weight; calls with few fp32 rows go to `op`."""

    def __init__(self, linear: nn.Linear, op: LinearOp, max_rows: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no random weights
        self.weight = linear.weight
        if "bias" in linear:
            self.bias = linear.bias
        self._op = op
        self._max_rows = max_rows

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if x.dtype == mx.float32 and x.size <= self._max_rows * w.shape[1]:
            return self._op(x, w, self.get("bias"))
        return super().__call__(x)


class RoutedEmbedding(nn.Embedding):
    """nn.Embedding over the same table; `as_linear` (a tied lm_head) routed like above."""

    def __init__(self, embedding: nn.Embedding, op: LinearOp, max_rows: int):
        nn.Module.__init__(self)
        self.weight = embedding.weight
        self._op = op
        self._max_rows = max_rows

    def as_linear(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if x.dtype == mx.float32 and x.size <= self._max_rows * w.shape[1]:
            return self._op(x, w, None)
        return super().as_linear(x)


def _routable(value) -> bool:
    return (type(value) in (nn.Linear, nn.Embedding) and value["weight"].dtype == mx.float32
            and value["weight"].ndim == 2)


def _route(value, make):
    """`value` with its routable descendants replaced (the same object when none is)."""
    if isinstance(value, nn.Module):
        if _routable(value):
            return make(value)
        changed = {k: r for k, v in value.items() if (r := _route(v, make)) is not v}
        if not changed:
            return value
        view = copy.copy(value)  # a new dict and __dict__ over the same values
        for key, routed in changed.items():
            view[key] = routed
        return view
    if isinstance(value, (list, tuple)):
        items = [_route(v, make) for v in value]
        same = all(a is b for a, b in zip(items, value, strict=True))
        return value if same else type(value)(items)
    if isinstance(value, dict):
        items = {k: _route(v, make) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


@dataclass(frozen=True)
class LinearRouting:
    """What the engine's linear layers run: `backend` "cpu-ext" (the compiled small-M
    linear for up to `max_rows` rows) or "reference" (MLX's matmul, `reason` says why)."""

    backend: str
    max_rows: int = 0
    routed_layers: int = 0
    reason: str = ""

    def report(self) -> dict:
        return {"backend": self.backend, "max_rows": self.max_rows,
                "routed_layers": self.routed_layers, "reason": self.reason}


def route_linears(model: nn.Module, op: LinearOp, max_rows: int) -> tuple[nn.Module, int]:
    """(view of `model` with its fp32 linears and embeddings routed, number routed)."""
    count = 0

    def make(layer):
        nonlocal count
        count += 1
        cls = RoutedLinear if isinstance(layer, nn.Linear) else RoutedEmbedding
        return cls(layer, op, max_rows)

    return _route(model, make), count


def select_linear(model: nn.Module, mode: str) -> tuple[nn.Module, LinearRouting]:
    """(the module tree the engine runs, what its linears run) for `mode` "auto" (the
    compiled small-M linear on MLX's CPU device when the extension loads) or "reference"
    (the model itself, MLX's matmul)."""
    from mlxkv.kernels.linear_cpu import MAX_ROWS, linear_primitive

    if mode == "reference":
        return model, LinearRouting("reference", reason="linear='reference' (MLXKV_LINEAR)")
    if mx.default_device() != mx.cpu:
        return model, LinearRouting("reference", reason="the default device is not the CPU")
    op = linear_primitive()
    if op is None:
        return model, LinearRouting("reference", reason="mlxkv._ext unavailable")
    view, count = route_linears(model, op, MAX_ROWS)
    if count == 0:
        return model, LinearRouting("reference", reason="no float32 nn.Linear/nn.Embedding")
    return view, LinearRouting("cpu-ext", MAX_ROWS, count)
