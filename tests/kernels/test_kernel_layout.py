"""The codec -> kernel contract: every codec describes its pool layout (`kernel_layout`),
and the dispatchers decide from that layout alone."""

from __future__ import annotations

import ast
from pathlib import Path

import mlx.core as mx
import pytest

from mlxkv.codec import get_codec
from mlxkv.codec.base import AFFINE, D4, E8, IDENTITY, LLOYD, KernelLayout
from mlxkv.codec.lloyd import levels
from mlxkv.kernels.kv_encode import is_kernel_supported as encode_supported
from mlxkv.kernels.kv_encode_cpu import is_write_supported
from mlxkv.kernels.paged_attention_cpu import _layer_plan
from mlxkv.kernels.paged_attention_quant import codec_kind

NAMES = ["identity", "fp16", "fp32", "bf16", "int8", "int4", "e8m2", "e8m3", "e8m4", "d4m2",
         "d4m3", "d4m4", "lloydm2", "lloydm3", "lloydm4"]
KINDS = {"identity": IDENTITY, "fp": IDENTITY, "bf": IDENTITY, "int": AFFINE, "e8": E8,
         "d4": D4, "lloyd": LLOYD}
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", NAMES)
def test_every_codec_describes_its_pool_components(name):
    codec = get_codec(name, seed=7)
    layout = codec.kernel_layout
    assert isinstance(layout, KernelLayout)
    assert layout.kind == next(v for k, v in KINDS.items() if name.startswith(k))
    spec = codec.packed_spec(128, mx.float32)
    assert set(layout.roles.values()) == set(spec)  # every component has a role, no extras
    packed = codec.encode(mx.random.normal((2, 128)))
    for role in layout.roles:
        assert layout.component(packed, role).shape[0] == 2
    assert layout.rotated == (layout.kind in (E8, D4, LLOYD))
    if layout.rotated:
        assert layout.rotation_seed == 7
    if layout.kind == AFFINE:
        assert layout.group_size == 64 and layout.bits == int(name[3:])
    if layout.kind == LLOYD:
        assert len(layout.levels) == 2**layout.bits
        # exactly the fp32 levels the codec encodes and decodes with (the compiled encode
        # rebuilds its thresholds from them)
        assert mx.array_equal(mx.array(layout.levels, dtype=mx.float32),
                              levels(codec.bits, codec.gain)).item()


class Unknown:
    """A codec of a layout family no kernel knows (as a future codec would be)."""

    name = "future"
    kernel_layout = KernelLayout("future", 4, {"codes": "codes"})


def test_unknown_layouts_go_to_the_reference():
    assert codec_kind(Unknown()) is None
    assert not encode_supported(mx.zeros((1, 64)), Unknown())
    assert not is_write_supported(mx.zeros((1, 64)), Unknown())
    ident = get_codec("fp32").kernel_layout
    assert _layer_plan(Unknown.kernel_layout, Unknown.kernel_layout, 64) is None
    assert _layer_plan(ident, Unknown.kernel_layout, 64) is None


def test_unsupported_bit_rates_go_to_the_reference():
    """A codec family the kernels know, at a bit rate they were not written for."""
    odd = type("Odd", (), {"name": "int3", "kernel_layout": KernelLayout(
        AFFINE, 3, {"codes": "q", "scales": "scales", "biases": "biases"}, group_size=64)})()
    assert codec_kind(odd) is None
    assert _layer_plan(odd.kernel_layout, odd.kernel_layout, 64) is None
    e8m5 = type("E8m5", (), {"name": "e8m5", "kernel_layout": KernelLayout(
        E8, 5, {"codes": "codes", "scales": "scale"}, rotation_seed=0, step=0.2)})()
    assert codec_kind(e8m5) is None and not encode_supported(mx.zeros((1, 64)), e8m5)


def _dispatch_sources():
    yield ROOT / "mlxkv" / "attention.py"
    yield from sorted((ROOT / "mlxkv" / "kernels").glob("*.py"))


@pytest.mark.parametrize("path", list(_dispatch_sources()), ids=lambda p: p.name)
def test_dispatchers_use_no_codec_classes_or_private_codec_names(path):
    """No isinstance on codec classes and no private import from mlxkv.codec."""
    tree = ast.parse(path.read_text())
    classes = {"IdentityCodec", "AffineCodec", "LatticeCodec", "LloydCodec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlxkv.codec"):
            names = {a.name for a in node.names}
            assert not names & classes, f"{path.name} imports {names & classes}"
            assert not [n for n in names if n.startswith("_")], f"{path.name}: {names}"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            assert not set(map(ast.unparse, node.args[1:])) & classes
