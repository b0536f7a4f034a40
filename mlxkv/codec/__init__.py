"""KV codecs and the `--kv-codec` spec parser.

Grammar (`,`-separated; the head first, then options):

    spec    := head ("," option)*
    head    := auto | identity | fp16 | fp32 | bf16 | int<b>        b in 2,3,4,5,6,8 (affine)
             | <family>:k<m>v<m>     family e8 | d4 | lloyd, m = 2..8 bits per coordinate
             | auto:<R>x             allocation for R times fewer bytes than fp16, from a
                                     stored sensitivity profile (mlxkv/codec/allocate.py)
    option  := boundary=N            first and last N layers at full precision
             | seed=S                rotation seed (V uses S + 1)
             | l<a>[-<b>]=<head>     layers a..b (inclusive) use <head> instead (no options)
             | profile=PATH          the profile file for auto:<R>x
             | family=F              auto:<R>x's codec family (default: the profile's)
             | ctx=N                 auto:<R>x budgets one N-token sequence (sliding-window
                                     layers weighted by the tokens they hold), not a token

Examples: `e8:k6v5`, `int6`, `e8:k5v5,boundary=1,l0=int8`, `auto:3.0x`.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlxkv.codec.affine import AFFINE_BITS, AffineCodec
from mlxkv.codec.base import KVCodec
from mlxkv.codec.identity import IdentityCodec
from mlxkv.codec.lattice import LatticeCodec
from mlxkv.codec.lloyd import LloydCodec
from mlxkv.errors import InvalidRequestError

__all__ = ["KVCodec", "IdentityCodec", "AffineCodec", "LatticeCodec", "LloydCodec",
           "get_codec", "parse_kv_codec"]

_SIMPLE = {"auto": None, "identity": None, "fp16": mx.float16, "fp32": mx.float32,
           "bf16": mx.bfloat16}
_AFFINE = {f"int{b}" for b in AFFINE_BITS}
_FAMILY = re.compile(r"(e8|d4|lloyd):k([2-8])v([2-8])")
_AUTO = re.compile(r"auto:(\d+(?:\.\d+)?)x")
_LAYERS = re.compile(r"l(\d+)(?:-(\d+))?")
LayerCodecs = dict[int, tuple[KVCodec, KVCodec]]


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="kv_codec")


def get_codec(name: str, seed: int = 0) -> KVCodec:
    """One codec by name: identity/fp16/fp32/bf16, int<b>, e8m<m>, d4m<m>, lloydm<m>."""
    if name in _SIMPLE:
        return IdentityCodec(_SIMPLE[name])
    if name in _AFFINE:
        return AffineCodec(int(name[3:]))
    match = re.fullmatch(r"(e8|d4|lloyd)m([2-8])", name)
    if match:
        family, bits = match.group(1), int(match.group(2))
        if family == "lloyd":
            return LloydCodec(bits, seed)
        return LatticeCodec(family, bits, seed)
    raise _bad(f"unknown KV codec {name!r}")


def head_codecs(head: str, seed: int = 0) -> tuple[KVCodec, KVCodec] | None:
    """(k_codec, v_codec) for one head spec; None for auto/identity (the model's dtype)."""
    match = _FAMILY.fullmatch(head)
    if match:
        family = match.group(1)
        return (get_codec(f"{family}m{match.group(2)}", seed),
                get_codec(f"{family}m{match.group(3)}", seed + 1))
    if head in ("auto", "identity"):
        return None
    if head in _SIMPLE or head in _AFFINE:
        codec = get_codec(head)
        return codec, codec
    raise _bad(f"unknown --kv-codec {head!r}; use auto, fp16, fp32, int8, int6, int4, "
               "e8:k6v5, d4:k5v5, lloyd:k6v5 (2..8 bits) or auto:3.0x, with optional "
               ",boundary=N,seed=S,l<a>-<b>=<codec>")


def _parse_options(opts: list[str]) -> tuple[dict, list[tuple[range, str]]]:
    options, overrides = {}, []
    for opt in opts:
        key, _, value = opt.partition("=")
        layers = _LAYERS.fullmatch(key)
        if layers and value:
            lo = int(layers.group(1))
            hi = int(layers.group(2)) if layers.group(2) else lo
            overrides.append((range(lo, hi + 1), value))
        elif key in ("boundary", "seed", "ctx") and value.isdigit():
            options[key] = int(value)
        elif key == "profile" and value:
            options[key] = value
        elif key == "family" and value in ("e8", "d4", "lloyd"):
            options[key] = value
        else:
            raise _bad(f"bad kv codec option {opt!r} (boundary=N, seed=S, l<a>-<b>=<codec>, "
                       "profile=PATH, family=e8|d4|lloyd, ctx=N)")
    return options, overrides


def parse_kv_codec(spec: str, num_layers: int,
                   model_name: str | None = None) -> LayerCodecs | None:
    """Per layer (k_codec, v_codec) for a `--kv-codec` spec; None means identity everywhere.

    `model_name` locates the stored profile of `auto:<R>x` (see mlxkv.codec.allocate).
    Raises InvalidRequestError for a malformed spec or a missing profile.
    """
    head, *opts = [part.strip() for part in spec.split(",")]
    options, overrides = _parse_options(opts)
    seed = options.get("seed", 0)
    auto = _AUTO.fullmatch(head)
    if auto:
        from mlxkv.codec.allocate import allocate_from_profile

        per_layer = allocate_from_profile(float(auto.group(1)), num_layers, model_name,
                                          options.get("profile"), options.get("family"),
                                          options.get("ctx") or None)
        overrides = [(range(i, i + 1), h) for i, h in enumerate(per_layer)] + overrides
        default = None
    else:
        default = head_codecs(head, seed)
    if default is None and not overrides and not options.get("boundary"):
        return None
    full = IdentityCodec()
    layers = {i: default or (full, full) for i in range(num_layers)}
    boundary = options.get("boundary", 0)
    for i in [*range(min(boundary, num_layers)), *range(max(0, num_layers - boundary),
                                                         num_layers)]:
        layers[i] = (full, full)
    for span, layer_head in overrides:
        if span.stop > num_layers:
            raise _bad(f"layer override {span.start}-{span.stop - 1} beyond {num_layers} layers")
        pair = head_codecs(layer_head, seed) or (full, full)
        for i in span:
            layers[i] = pair
    return layers
