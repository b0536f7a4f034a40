"""Run Metal kernel bodies on the CPU: MLX's signature generator + a C++ emulation of MSL.

`make_kernel_source(launch)` rebuilds, character for character, the source that
`mx.fast.metal_kernel` compiles (MLX 0.32's signature writer for custom kernels: template
header, `[[kernel]] void custom_kernel_<name>_<template hash>_<dtype suffixes>(...)` with
`const device T* x [[buffer(i)]]` inputs (`constant` below 8 elements, `&` for 0-d),
`_shape/_strides/_ndim` buffers when the body names them, outputs, then the Metal
attributes the body mentions, in MLX's table order; the explicit host_name instantiation).
`emulate(launch)` compiles that source with g++ against emu/msl_emu.h (once per distinct
source, cached as a .so under a temp dir) and runs it on guarded copies of the inputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkv.kernels._source import KernelLaunch

EMU_DIR = Path(__file__).resolve().parent / "emu"
CACHE_DIR = Path(os.environ.get("MLXKV_EMU_CACHE", Path(tempfile.gettempdir()) / "mlxkv_msl_emu"))
CXX_FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-fno-strict-aliasing",
             "-U_FORTIFY_SOURCE"]

MAX_CONSTANT_ARRAY_SIZE = 8
# mlx/backend/common/metal_kernel.cpp: metal_attributes (order matters).
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
_UNSUPPORTED_ATTRS = {"dispatch_quadgroups_per_threadgroup", "quadgroup_index_in_threadgroup",
                      "quadgroups_per_threadgroup", "thread_index_in_quadgroup"}
TYPE_STRING = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool",
    mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}


def _template_text(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # std::ostream << bool without boolalpha
    if isinstance(value, int):
        return str(value)
    return TYPE_STRING[value]


def _template_param(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "int" if isinstance(value, int) else "typename"


def kernel_name(launch: KernelLaunch) -> str:
    """The name mx.fast.metal_kernel gives the generated function."""
    name = "custom_kernel_" + launch.spec.name
    if launch.template:
        template_def = "<" + ", ".join(_template_text(v) for _, v in launch.template) + ">"
        name += "_" + template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for arr in launch.inputs:
        name += "_" + TYPE_STRING[arr.dtype]
        if arr.ndim == 0:
            name += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            name += "c"
    for dtype in launch.output_dtypes:
        name += "_" + TYPE_STRING[dtype]
    return name


def attributes(source: str) -> list[tuple[str, str]]:
    return [(attr, ty) for attr, ty in METAL_ATTRIBUTES if attr in source]


def _params(launch: KernelLaunch) -> list[tuple[str, str, str]]:
    """(declaration, kind, ctype) per buffer in buffer-index order; kind: in/scalar/out."""
    spec, out = launch.spec, []
    for name, arr in zip(spec.input_names, launch.inputs, strict=True):
        loc = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        ty = TYPE_STRING[arr.dtype]
        out.append((f"  const {loc} {ty}{ref} {name}", "scalar" if arr.ndim == 0 else "in", ty))
        if arr.ndim > 0:
            for suffix, decl, ty2 in (("_shape", "const constant int*", "int"),
                                      ("_strides", "const constant int64_t*", "int64_t"),
                                      ("_ndim", "const constant int&", "int")):
                if name + suffix in spec.source:
                    kind = "scalar" if suffix == "_ndim" else "in"
                    out.append((f"  {decl} {name}{suffix}", kind, ty2))
    for name, dtype in zip(spec.output_names, launch.output_dtypes, strict=True):
        out.append((f"  device {TYPE_STRING[dtype]}* {name}", "out", TYPE_STRING[dtype]))
    return out


def make_kernel_source(launch: KernelLaunch) -> str:
    """Exactly the Metal source mx.fast.metal_kernel generates (after MLX's own prelude)."""
    spec, fname = launch.spec, kernel_name(launch)
    text = spec.header
    if launch.template:
        text += "template <" + ", ".join(
            f"{_template_param(v)} {n}" for n, v in launch.template) + ">\n"
    text += f"[[kernel]] void {fname}(\n"
    # Same loop as mlx's write_signature, including its index arithmetic for the closing
    # parenthesis (it compares the buffer index, shape buffers included, with
    # num_inputs + num_outputs - 1).
    attrs = [f"  {ty} {attr} [[{attr}]]" for attr, ty in attributes(spec.source)]
    bound = len(launch.inputs) + len(spec.output_names) - 1
    for index, (decl, kind, _) in enumerate(_params(launch)):
        if kind != "out":
            text += f"{decl} [[buffer({index})]],\n"
        else:
            text += f"{decl} [[buffer({index})]]"
            text += ",\n" if index < bound or attrs else ") {\n"
    for i, attr in enumerate(attrs):
        text += attr + (",\n" if i < len(attrs) - 1 else ") {\n")
    text += spec.source + "\n}\n"
    if launch.template:
        tdef = fname + "<" + ", ".join(_template_text(v) for _, v in launch.template) + ">"
        text += (f'\ntemplate [[host_name("{fname}")]] [[kernel]] decltype({tdef}) {tdef};\n')
    return text


_TG_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:]*)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def to_cpp(metal_source: str) -> str:
    """The emulator's only rewrite: `threadgroup T x[N];` -> a per-threadgroup arena slot."""
    return _TG_DECL.sub(r"auto& \2 = *mtl_emu::tg_alloc<\1\3>(__COUNTER__);", metal_source)


def _launcher(launch: KernelLaunch) -> str:
    args = []
    for i, (_, kind, ty) in enumerate(_params(launch)):
        if kind == "scalar":
            args.append(f"*(const {ty}*)b[{i}]")
        else:
            args.append(f"({'' if kind == 'out' else 'const '}{ty}*)b[{i}]")
    for attr, _ in attributes(launch.spec.source):
        if attr in _UNSUPPORTED_ATTRS:
            raise NotImplementedError(f"the emulator has no quadgroups ({attr})")
        args.append(f"c.{attr}")
    call = kernel_name(launch)
    if launch.template:
        call += "<" + ", ".join(_template_text(v) for _, v in launch.template) + ">"
    return (
        "static void mtl_emu_trampoline(void* body, const mtl_emu::Ctx& c) {\n"
        "  void** b = static_cast<void**>(body);\n"
        f"  {call}({', '.join(args)});\n}}\n"
        'extern "C" int mtl_emu_launch(void** b, const long* grid, const long* tg, unsigned seed,'
        " char* err, int err_len) {\n"
        "  return mtl_emu::run_grid(grid, tg, seed, b, mtl_emu_trampoline, err, err_len);\n}\n"
    )


def cpp_source(launch: KernelLaunch) -> str:
    """The C++ translation unit g++ compiles for `launch` (emulator line numbers refer to it)."""
    return '#include "msl_emu.h"\n' + to_cpp(make_kernel_source(launch)) + _launcher(launch)


def build(launch: KernelLaunch) -> ctypes.CDLL:
    """Compile (or reuse) the .so of this exact generated source."""
    cpp = cpp_source(launch)
    emu_header = "".join(p.read_text() for p in sorted(EMU_DIR.glob("*.h")))
    key = hashlib.sha256((cpp + emu_header + " ".join(CXX_FLAGS)).encode()).hexdigest()[:20]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    so = CACHE_DIR / f"k_{key}.so"
    if not so.exists():
        src = CACHE_DIR / f"k_{key}.{os.getpid()}.cpp"
        src.write_text(cpp)
        tmp = CACHE_DIR / f"k_{key}.{os.getpid()}.so"
        proc = subprocess.run(["g++", *CXX_FLAGS, f"-I{EMU_DIR}", str(src), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"g++ failed for {launch.spec.name}:\n{proc.stderr[-4000:]}")
        os.replace(tmp, so)
        src.unlink()
    lib = ctypes.CDLL(str(so))
    lib.mtl_emu_alloc.restype = ctypes.c_void_p
    lib.mtl_emu_alloc.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_long)]
    lib.mtl_emu_free.argtypes = [ctypes.c_void_p, ctypes.c_long]
    lib.mtl_emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_long),
                                   ctypes.c_uint, ctypes.c_char_p, ctypes.c_int]
    return lib


class EmulationError(RuntimeError):
    """The kernel broke a rule of the execution model (or faulted)."""


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.ascontiguousarray(np.array(x))


def _from_numpy(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16,
       mx.int32: np.int32, mx.uint32: np.uint32, mx.uint8: np.uint8, mx.int64: np.int64,
       mx.uint16: np.uint16, mx.int8: np.int8, mx.int16: np.int16}


def emulate(launch: KernelLaunch, seed: int = 0) -> list[mx.array]:
    """Run `launch` on the CPU emulator; outputs start poisoned (0xFF bytes) unless init_value."""
    lib = build(launch)
    host: list[np.ndarray] = []
    for name, arr in zip(launch.spec.input_names, launch.inputs, strict=True):
        host.append(_to_numpy(arr))
        if arr.ndim > 0:
            if name + "_shape" in launch.spec.source:
                host.append(np.array(arr.shape, dtype=np.int32))
            if name + "_strides" in launch.spec.source:
                host.append(np.array([s // 1 for s in _strides(arr.shape)], dtype=np.int64))
            if name + "_ndim" in launch.spec.source:
                host.append(np.array(arr.ndim, dtype=np.int32))
    outs = []
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes, strict=True):
        out = np.empty(shape, dtype=_NP[dtype])
        if launch.init_value is None:
            out.view(np.uint8)[...] = 0xFF
        else:
            out[...] = np.asarray(launch.init_value).astype(out.dtype)
        outs.append(out)
    bufs, regions = [], []
    try:
        for arr in host + outs:
            base, total = ctypes.c_void_p(), ctypes.c_long()
            ptr = lib.mtl_emu_alloc(arr.nbytes, ctypes.byref(base), ctypes.byref(total))
            ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)
            bufs.append(ptr)
            regions.append((base, total))
        err = ctypes.create_string_buffer(512)
        rc = lib.mtl_emu_launch((ctypes.c_void_p * len(bufs))(*bufs),
                                (ctypes.c_long * 3)(*launch.grid),
                                (ctypes.c_long * 3)(*launch.threadgroup), seed, err, 512)
        if rc:
            message = _quote_lines(err.value.decode(), cpp_source(launch))
            raise EmulationError(f"{launch.spec.name}: {message}")
        for out, ptr in zip(outs, bufs[len(host):], strict=True):
            ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
    finally:
        for base, total in regions:
            lib.mtl_emu_free(base, total)
    return [_from_numpy(o, d) for o, d in zip(outs, launch.output_dtypes, strict=True)]


def _quote_lines(message: str, cpp: str) -> str:
    """`line N` in an emulator message -> `line N: <that line of the generated source>`."""
    lines = cpp.splitlines()

    def quote(m: re.Match) -> str:
        n = int(m.group(1))
        return f"line {n}: `{lines[n - 1].strip()}`" if 0 < n <= len(lines) else m.group(0)

    return re.sub(r"line (\d+)", quote, message)


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return list(reversed(strides))


def mutate(launch: KernelLaunch, old: str, new: str, *, in_header: bool = False) -> KernelLaunch:
    """A copy of `launch` with `old` replaced by `new` (exactly once) in its body or header."""
    from dataclasses import replace

    field = "header" if in_header else "source"
    text = getattr(launch.spec, field)
    if text.count(old) != 1:
        raise ValueError(f"mutation target must occur once, found {text.count(old)}: {old!r}")
    spec = replace(launch.spec, **{field: text.replace(old, new)})
    return replace(launch, spec=spec)
