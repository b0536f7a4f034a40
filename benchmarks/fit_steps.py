"""Fit the codecs' step constants on captured K/V: one constant per (family, rate).

K and V vectors are captured (as the KV store receives them: post-RoPE K, V) from each
model on a calibration text (Emma: never an evaluation window, which come from Mansfield
Park), and for every family and rate the step c (lattice: s = c * rms of the rotated
vector) or gain g (Lloyd-Max: levels * g) minimising the relative MSE, averaged over
(model, K/V), is found by a grid search. The constants are then copied into
mlxkv/codec/lattice.py (_STEP) and mlxkv/codec/lloyd.py (_GAIN).

    python benchmarks/fit_steps.py
"""

# ruff: noqa: I001  (benchmarks/_common must be imported before mlx: it preloads OpenBLAS)
from __future__ import annotations

import argparse

from _common import header, print_header, write_json  # first: BLAS

import mlx.core as mx  # noqa: E402
import numpy as np

from mlxkv.codec import IdentityCodec
from mlxkv.codec.lattice import _STEP, RATES, LatticeCodec
from mlxkv.codec.lloyd import _GAIN, LloydCodec
from mlxkv.kv_profile import calibration_windows, prefill_logits


class _Capture(IdentityCodec):
    def __init__(self, sink: list) -> None:
        super().__init__(None)
        self.sink = sink

    def encode(self, x):
        self.sink.append(x)
        return super().encode(x)


def capture(model, windows, per_tensor: int, seed: int = 0) -> dict[str, mx.array]:
    """{"k"|"v": [per_tensor, head_dim]} sampled over layers, heads and tokens."""
    sinks = {"k": [], "v": []}
    codecs = {i: (_Capture(sinks["k"]), _Capture(sinks["v"])) for i in range(len(model.layers))}
    mx.eval(prefill_logits(model, codecs, windows))
    rng = np.random.default_rng(seed)
    out = {}
    for kv, xs in sinks.items():
        by_dim = np.concatenate([np.array(x).reshape(-1, x.shape[-1]) for x in xs])
        pick = rng.choice(len(by_dim), size=min(per_tensor, len(by_dim)), replace=False)
        out[kv] = mx.array(by_dim[pick])
    return out


def rel_mse(codec, x: mx.array) -> float:
    y = codec.decode(codec.encode(x), mx.float32)
    return (mx.sum((y - x) ** 2) / mx.sum(x * x)).item()


def fit(sets: list[mx.array], make, start: float, span: float = 0.75, points: int = 11):
    """(best constant, its mean relative MSE, the Gaussian-start MSE) over the sets."""
    grid = start * 2.0 ** np.linspace(-span, span, points)
    scores = [np.mean([rel_mse(make(float(c)), x) for x in sets]) for c in grid]
    best = int(np.argmin(scores))
    if best in (0, points - 1):  # on the edge: widen once
        return fit(sets, make, float(grid[best]), span, points)
    fine = grid[best] * 2.0 ** np.linspace(-0.08, 0.08, 5)
    fscores = [np.mean([rel_mse(make(float(c)), x) for x in sets]) for c in fine]
    i = int(np.argmin(fscores))
    return float(fine[i]), float(fscores[i]), float(np.mean([rel_mse(make(start), x)
                                                             for x in sets]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--per-tensor", type=int, default=2048)
    args = p.parse_args(argv)
    from _corpus import austen

    from mlxkv.models.loader import load_model

    text = austen("emma")[20_000:]
    sets = []
    for name in args.models:
        loaded = load_model(name)
        windows = calibration_windows(loaded.tokenizer, text, args.ctx, args.windows)
        got = capture(loaded.model, windows, args.per_tensor)
        sets += [got["k"], got["v"]]
        del loaded
    h = header(",".join(args.models), "float32", vars(args) | {"text": "Emma from char 20000"})
    print_header(h)
    rows = []
    for family in ("e8", "d4", "lloyd"):
        for m in RATES:
            if family == "lloyd":
                c, mse, mse0 = fit(sets, lambda g, m=m: LloydCodec(m, gain=g), _GAIN[m], 0.4)
            else:
                c, mse, mse0 = fit(sets, lambda s, f=family, m=m: LatticeCodec(f, m, step=s),
                                   _STEP[(family, m)])
            rows.append({"family": family, "bits": m, "constant": round(c, 4),
                         "rel_mse": mse, "rel_mse_before": mse0})
            print(f"{family:>5} m={m}: {c:.4f}  rel MSE {mse:.3e} (before {mse0:.3e})")
    return write_json("fit_steps", {**h, "rows": rows})


if __name__ == "__main__":
    main()
