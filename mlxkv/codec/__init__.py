"""KV codecs and the `--kv-codec` spec parser.

Specs: `auto` / `identity` (model dtype), `fp16`, `fp32`, `bf16`, `int8`, `int4`
(affine, group 64), and `<family>:k<m>v<m>` for `e8`, `d4` and `lloyd` with separate bits
for K and V (e.g. `e8:k4v3`). Options after commas: `boundary=N` keeps the first and last N
layers at full precision, `seed=S` seeds the rotation.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlxkv.codec.affine import AffineCodec
from mlxkv.codec.base import KVCodec
from mlxkv.codec.identity import IdentityCodec
from mlxkv.codec.lattice import LatticeCodec
from mlxkv.codec.lloyd import LloydCodec
from mlxkv.errors import InvalidRequestError

__all__ = ["KVCodec", "IdentityCodec", "AffineCodec", "LatticeCodec", "LloydCodec",
           "get_codec", "parse_kv_codec"]

_SIMPLE = {"auto": None, "identity": None, "fp16": mx.float16, "fp32": mx.float32,
           "bf16": mx.bfloat16}


def get_codec(name: str, seed: int = 0) -> KVCodec:
    """One codec by name: identity/fp16/fp32/bf16, int8/int4, e8m<m>, d4m<m>, lloydm<m>."""
    if name in _SIMPLE:
        return IdentityCodec(_SIMPLE[name])
    if name in ("int8", "int4"):
        return AffineCodec(int(name[3:]))
    match = re.fullmatch(r"(e8|d4|lloyd)m([234])", name)
    if match:
        family, bits = match.group(1), int(match.group(2))
        if family == "lloyd":
            return LloydCodec(bits, seed)
        return LatticeCodec(family, bits, seed)
    raise InvalidRequestError(f"unknown KV codec {name!r}", param="kv_codec")


def parse_kv_codec(spec: str, num_layers: int) -> dict[int, tuple[KVCodec, KVCodec]] | None:
    """Per layer (k_codec, v_codec) for a `--kv-codec` spec; None means identity everywhere."""
    head, *opts = [part.strip() for part in spec.split(",")]
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("boundary", "seed") or not value.isdigit():
            raise InvalidRequestError(f"bad kv codec option {opt!r} (boundary=N, seed=S)",
                                      param="kv_codec")
        options[key] = int(value)
    seed = options.get("seed", 0)
    match = re.fullmatch(r"(e8|d4|lloyd):k([234])v([234])", head)
    if match:
        family = match.group(1)
        k, v = get_codec(f"{family}m{match.group(2)}", seed), get_codec(
            f"{family}m{match.group(3)}", seed + 1)
    elif head in _SIMPLE or head in ("int8", "int4"):
        if head in ("auto", "identity"):
            return None
        k = v = get_codec(head)
    else:
        raise InvalidRequestError(
            f"unknown --kv-codec {spec!r}; use auto, fp16, fp32, int8, int4, e8:k4v3, "
            "d4:k4v3 or lloyd:k4v3, with optional ,boundary=N,seed=S", param="kv_codec")
    boundary = options.get("boundary", 0)
    full = IdentityCodec()
    return {
        layer: (full, full) if layer < boundary or layer >= num_layers - boundary else (k, v)
        for layer in range(num_layers)
    }
