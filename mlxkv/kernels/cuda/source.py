"""The Metal bodies as CUDA kernels for MLX's CUDA backend (`mx.fast.cuda_kernel`).

A `KernelLaunch` (mlxkv/kernels/_source.py) runs unchanged: the body is the same text as on
Metal, and the header is prelude.cuh (the MSL subset in CUDA terms) followed by
metal/common.h. `run_cuda` is the executor; `assemble(launch)` rebuilds, character for
character, the translation unit `mx.fast.cuda_kernel` hands to NVRTC (MLX 0.32's
mlx/backend/cuda/custom_kernel.cpp: its default header, ours, then `__global__ void
custom_kernel_<name><template hash>(...)` in namespace mlx::core::cu with the template
arguments as constexpr/using lines), so tests/kernels/test_nvrtc.py compiles exactly that
without a GPU.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import mlx.core as mx

from mlxkv.kernels._source import KernelLaunch, KernelSpec, call_kernel

# mlx/backend/cuda/utils.cpp: dtype_to_cuda_type
CUDA_TYPE = {
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
}
# get_type_string (the template hash of the kernel name)
_TYPE_STRING = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
                mx.int32: "int32_t", mx.uint8: "uint8_t", mx.uint32: "uint32_t"}
MLX_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

#define inf cuda::std::numeric_limits<float>::infinity()

"""


@functools.cache
def prelude() -> str:
    """Text of prelude.cuh."""
    return (resources.files("mlxkv.kernels.cuda") / "prelude.cuh").read_text()


def cuda_header(spec: KernelSpec) -> str:
    """The `header` argument of mx.fast.cuda_kernel: the prelude, then the Metal header."""
    return prelude() + "\n" + spec.header


def cuda_name(spec: KernelSpec) -> str:
    """Kernel name with a digest of its text: MLX caches compiled PTX on disk by name."""
    digest = hashlib.sha1((spec.header + spec.source).encode()).hexdigest()[:10]
    return f"{spec.name}_{digest}"


def _template_hash(template) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append("_" + _TYPE_STRING.get(value, str(value)))
    return "".join(parts)


def _template_lines(template) -> str:
    lines = []
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};\n")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};\n")
        else:
            lines.append(f"  using {name} = {CUDA_TYPE[value]};\n")
    return "".join(lines) + ("\n" if lines else "")


def _params(launch: KernelLaunch) -> str:
    spec, source = launch.spec, launch.spec.source
    params = []
    for name, arr in zip(spec.input_names, launch.inputs, strict=True):
        params.append(f"    const {CUDA_TYPE[arr.dtype]}* {name}")
        if arr.ndim > 0:
            for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if name + suffix in source:
                    params.append(f"    const __grid_constant__ {kind} {name}{suffix}")
    for name, dtype in zip(spec.output_names, launch.output_dtypes, strict=True):
        params.append(f"    {CUDA_TYPE[dtype]}* {name}")
    return ",\n".join(params)


def kernel_function_name(launch: KernelLaunch) -> str:
    """`custom_kernel_<name><template hash>`, as MLX names the __global__ function."""
    return f"custom_kernel_{cuda_name(launch.spec)}{_template_hash(launch.template)}"


def assemble(launch: KernelLaunch) -> str:
    """The CUDA translation unit mx.fast.cuda_kernel builds for `launch` (see the docstring)."""
    return (MLX_DEFAULT_HEADER + cuda_header(launch.spec)
            + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            + f"__global__ void {kernel_function_name(launch)}(\n{_params(launch)}) {{\n"
            + _template_lines(launch.template) + launch.spec.source
            + "\n}\n\n} // namespace mlx::core::cu\n")


@functools.cache
def _build(spec: KernelSpec):
    return mx.fast.cuda_kernel(
        name=cuda_name(spec),
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=cuda_header(spec),
        ensure_row_contiguous=True,
    )


def run_cuda(launch: KernelLaunch, verbose: bool = False) -> list[mx.array]:
    """Execute `launch` with mx.fast.cuda_kernel (built once per spec); grid in threads."""
    return call_kernel(_build(launch.spec), launch, verbose)
