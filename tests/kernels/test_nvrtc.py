"""The CUDA twins compile: each kernel's source, exactly as mx.fast.cuda_kernel assembles it
(mlxkv/kernels/cuda/source.py `assemble`), goes through NVRTC, the compiler library of the
`nvidia-cuda-nvrtc` wheel (no GPU needed), with the CUDA headers of the nvidia-cuda-runtime
and nvidia-cuda-cccl wheels, for sm_90 (ptxas runs too: register and shared-memory limits).

The one stand-in is MLX's JIT header mlx/backend/cuda/device/utils.cuh, which only libmlx's
CUDA build carries: `UTILS_CUH` gives what the generated code needs from it (the fp16/bf16
types, cuda::std, Shape/Strides). A planted type error must fail, so the check can bite.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform

import mlx.core as mx
import pytest

from mlxkv.codec import parse_kv_codec
from mlxkv.kernels.cuda.source import assemble, kernel_function_name
from mlxkv.kernels.kv_encode import plan_kv_encode
from mlxkv.kernels.paged_attention import plan_paged_attention
from mlxkv.kernels.paged_attention_combine import plan_paged_attention_combine
from mlxkv.kernels.paged_attention_quant import plan_paged_attention_quant
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.kv_store import KVStore

UTILS_CUH = """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/tuple>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""
ARCH = "sm_90"


def _cuda_root() -> str:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the nvidia-cuda-nvrtc wheel is a Linux x86_64 dev dependency")
    try:
        import nvidia
    except ImportError:
        pytest.fail("nvidia-cuda-nvrtc is not installed (pip install -e '.[dev]')")
    for base in nvidia.__path__:
        for root in sorted(glob.glob(os.path.join(base, "cu*")), reverse=True):
            if glob.glob(os.path.join(root, "lib", "libnvrtc.so*")):
                return root
    pytest.fail("libnvrtc not found under the nvidia wheels")


class NVRTC:
    """ctypes binding of the few NVRTC calls MLX's JitModule makes."""

    def __init__(self, root: str):
        lib_dir = os.path.join(root, "lib")
        for builtins in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        libs = [p for p in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc.so*")))
                if ".alt." not in p]
        self.lib = ctypes.CDLL(libs[0])
        includes = [os.path.join(root, "include"), os.path.join(root, "include", "cccl")]
        missing = [p for p in ("cuda_fp16.h", "cccl/nv/target")
                   if not os.path.exists(os.path.join(root, "include", p))]
        if missing:
            pytest.fail(f"CUDA headers missing ({missing}): install nvidia-cuda-runtime and "
                        "nvidia-cuda-cccl (the dev extra)")
        self.options = [f"--gpu-architecture={ARCH}".encode()] + [
            f"--include-path={p}".encode() for p in includes]

    def compile(self, source: str, kernel: str) -> tuple[bool, str]:
        """(success, log) of compiling `source` and lowering the name `kernel`."""
        lib, prog = self.lib, ctypes.c_void_p()
        names = (ctypes.c_char_p * 1)(b"mlx/backend/cuda/device/utils.cuh")
        headers = (ctypes.c_char_p * 1)(UTILS_CUH.encode())
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 1,
                                      headers, names) == 0
        try:
            assert lib.nvrtcAddNameExpression(prog, kernel.encode()) == 0
            opts = (ctypes.c_char_p * len(self.options))(*self.options)
            result = lib.nvrtcCompileProgram(prog, len(self.options), opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            if result == 0:
                lowered = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(lowered)) == 0
                assert lowered.value
            return result == 0, log.value.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc() -> NVRTC:
    return NVRTC(_cuda_root())


def _pools(spec: str, kvh: int, D: int, dtype):
    k_codec, v_codec = parse_kv_codec(spec, 1)[0]
    store = KVStore([KVGroupSpec((0,), kvh, D)], [3], 16, dtype, {0: (k_codec, v_codec)})
    return store.k_pool(0), store.v_pool(0), k_codec, v_codec


def _tables(B: int):
    return mx.zeros((B, 2), dtype=mx.int32), mx.ones((B,), dtype=mx.int32)


def dense_launch(dtype, D, gqa):
    kvh = 2
    pool = mx.zeros((3, 16, kvh, D), dtype=dtype)
    tables, lens = _tables(2)
    return plan_paged_attention(queries=mx.zeros((2, kvh * gqa, D), dtype=dtype), k_pool=pool,
                                v_pool=pool, block_tables=tables, seq_lens=lens, scale=0.1)


def quant_launch(spec, dtype, D, gqa):
    k_pool, v_pool, kc, vc = _pools(spec, 2, D, dtype)
    tables, lens = _tables(2)
    launch, _ = plan_paged_attention_quant(
        queries=mx.zeros((2, 2 * gqa, D), dtype=dtype), k_pool=k_pool, v_pool=v_pool,
        k_codec=kc, v_codec=vc, block_tables=tables, seq_lens=lens, scale=0.1)
    return launch


def combine_launch(dtype, D, unrot):
    signs = mx.ones((D,)) if unrot else None
    return plan_paged_attention_combine(o_part=mx.zeros((2, 3, 4, D)),
                                        lse_part=mx.zeros((2, 3, 4)), dtype=dtype, signs=signs)


def encode_launch(spec, dtype, D):
    codec = parse_kv_codec(spec, 1)[0][0]
    return plan_kv_encode(x=mx.zeros((5, D), dtype=dtype), codec=codec)


LAUNCHES = {
    "attention-fp32-d64-g1": lambda: dense_launch(mx.float32, 64, 1),
    "attention-fp16-d128-g4": lambda: dense_launch(mx.float16, 128, 4),
    "attention-bf16-d256-g2": lambda: dense_launch(mx.bfloat16, 256, 2),
    "quant-int4-fp32-d128-g4": lambda: quant_launch("int4", mx.float32, 128, 4),
    "quant-int8-fp16-d64-g1": lambda: quant_launch("int8", mx.float16, 64, 1),
    "quant-e8k4v3-bf16-d128-g2": lambda: quant_launch("e8:k4v3", mx.bfloat16, 128, 2),
    "quant-d4k3v2-fp32-d256-g1": lambda: quant_launch("d4:k3v2", mx.float32, 256, 1),
    "combine-fp32-d128": lambda: combine_launch(mx.float32, 128, False),
    "combine-unrot-bf16-d64": lambda: combine_launch(mx.bfloat16, 64, True),
    "combine-unrot-fp16-d256": lambda: combine_launch(mx.float16, 256, True),
    "encode-e8m3-fp32-d128": lambda: encode_launch("e8:k3v3", mx.float32, 128),
    "encode-d4m4-fp16-d64": lambda: encode_launch("d4:k4v4", mx.float16, 64),
}


@pytest.mark.parametrize("case", sorted(LAUNCHES))
def test_cuda_twin_compiles_under_nvrtc(nvrtc, case):
    launch = LAUNCHES[case]()
    ok, log = nvrtc.compile(assemble(launch), f"mlx::core::cu::{kernel_function_name(launch)}")
    assert ok, log[-3000:]


def test_a_planted_type_error_fails_to_compile(nvrtc):
    launch = LAUNCHES["attention-fp32-d64-g1"]()
    bad = launch.spec.source.replace("s = simd_sum(s);", "s = simd_sum(&s);")
    assert bad != launch.spec.source
    ok, log = nvrtc.compile(assemble(launch).replace(launch.spec.source, bad),
                            f"mlx::core::cu::{kernel_function_name(launch)}")
    assert not ok and "simd_sum" in log


def test_assembled_source_has_mlx_layout():
    """Signature, template lines and namespace as MLX writes them (custom_kernel.cpp)."""
    launch = combine_launch(mx.float16, 64, True)
    src = assemble(launch)
    name = kernel_function_name(launch)
    assert name.startswith("custom_kernel_mlxkv_paged_attention_combine_")
    assert name.endswith("_float16_t_64_3_t")
    assert f"__global__ void {name}(\n    const float* o_part,\n" in src
    assert "    __half* out) {\n  using T = __half;\n  constexpr int D = 64;\n" in src
    assert "  constexpr bool UNROT = true;\n\n" in src
    assert src.endswith("\n}\n\n} // namespace mlx::core::cu\n")
