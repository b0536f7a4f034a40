"""Kernel entry points: Metal kernels (mx.fast.metal_kernel) with pure-mx reference twins.

Every op is a triad `<op>_kernel` / `<op>_ref` / `<op>` (dispatcher: the kernel when
`mx.metal.is_available()` and the shape/codec is supported, else the reference). Kernel
bodies live in metal/*.metal; docs/kernels.md gives layouts, template parameters and grids.
"""

from __future__ import annotations

from mlxkv.kernels.kv_encode import kv_encode, kv_encode_kernel, kv_encode_ref, kv_write
from mlxkv.kernels.paged_attention import (
                                           paged_attention,
                                           paged_attention_kernel,
                                           paged_attention_ref,
)
from mlxkv.kernels.paged_attention_combine import (
                                           paged_attention_combine,
                                           paged_attention_combine_kernel,
                                           paged_attention_combine_ref,
)
from mlxkv.kernels.paged_attention_quant import (
                                           paged_attention_quant,
                                           paged_attention_quant_kernel,
                                           paged_attention_quant_ref,
)

__all__ = [
    "paged_attention", "paged_attention_kernel", "paged_attention_ref",
    "paged_attention_combine", "paged_attention_combine_kernel", "paged_attention_combine_ref",
    "paged_attention_quant", "paged_attention_quant_kernel", "paged_attention_quant_ref",
    "kv_encode", "kv_encode_kernel", "kv_encode_ref", "kv_write",
]
