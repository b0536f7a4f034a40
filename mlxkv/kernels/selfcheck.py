"""Start-up self-check and runtime guard of the attention kernels (docs/kernels.md).

`detect_backend` picks the kernels for this machine: Metal or CUDA bodies, the compiled CPU
primitive (mlxkv._ext), or none (the pure-mx reference). A `KernelGuard` stands between the
engine and them:

- self-check (accelerators only, `run_selfcheck`): every kernel variant the engine will use
  (one per layer codec pair and geometry, through the split and the unsplit path; the
  lattice encode) runs once on small pools shaped like the configured ones and is compared
  with its pure-mx twin;
- runtime guard (`decode` / `encode` / `write`): an exception from a launch disables that
  variant and the reference computes the call, so no request fails. The first launch of a
  variant the self-check did not run is evaluated inside the guard, so its compile error
  surfaces here and not in the step's eval.

A disabled variant logs one warning line with the reason; `report()` is what /health,
/v1/cache/stats and /metrics show. The guard is owned by the engine thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from mlxkv.kernels._source import run_metal
from mlxkv.kernels.kv_encode import is_kernel_supported as encode_supported
from mlxkv.kernels.kv_encode import kv_encode_kernel, kv_encode_ref
from mlxkv.kernels.kv_encode_cpu import cpu_write, is_write_supported
from mlxkv.kernels.paged_attention import attend_ref, visible_mask
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.kv_store import KVStore, Writer

log = logging.getLogger(__name__)
DecodeOp = Callable[..., mx.array | None]
Encoder = Callable[..., dict[str, mx.array]]
# Self-check tolerance per query dtype, times max(1, max |reference|).
TOLERANCE = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 5e-2}
_NUM_BLOCKS = 8  # blocks of each self-check pool (block 0 is the null block)


@dataclass(frozen=True)
class Backend:
    """The kernels of one machine. `encoder` None: the store keeps its default encoder."""

    name: str  # "metal" | "cuda" | "cpu-ext" | "reference"
    decode_op: DecodeOp | None
    encoder: Encoder | None = None
    is_accelerator: bool = False
    prefill_op: Callable[..., mx.array | None] | None = None  # the decode op's prefill twin
    writer: Writer | None = None  # compiled encode-into-the-pool (KVStore.writer contract)


@dataclass(slots=True)
class KernelStatus:
    """state: "ok" (checked), "unchecked", "declined" (not covered) or "disabled"."""

    state: str
    reason: str | None = None


def kernel_encoder(executor) -> Encoder:
    """Encoder running the lattice encode kernel through `executor`, codec.encode otherwise."""

    def encode(*, x: mx.array, codec) -> dict[str, mx.array]:
        if encode_supported(x, codec):
            return kv_encode_kernel(x=x, codec=codec, executor=executor)
        return kv_encode_ref(x=x, codec=codec)

    return encode


def is_cuda_available() -> bool:
    """True when MLX runs on its CUDA backend."""
    try:
        return bool(mx.cuda.is_available())
    except Exception:  # noqa: BLE001  (builds without the cuda module)
        return False


def detect_backend(attention_name: str = "auto", verbose: bool = False) -> Backend:
    """The kernels `attention_name` ("auto" | "reference") selects on this machine."""
    from mlxkv import attention

    if attention_name == "reference":
        return Backend("reference", None)
    if is_cuda_available():
        from mlxkv.kernels.cuda import run_cuda

        executor = partial(run_cuda, verbose=verbose)
        return Backend("cuda", partial(attention.kernel_decode, executor=executor),
                       kernel_encoder(executor), True)
    op = attention.default_decode_op(attention_name, verbose)
    if attention.is_metal_available():
        return Backend("metal", op, kernel_encoder(partial(run_metal, verbose=verbose)), True)
    if op is None:
        return Backend("reference", None)
    return Backend("cpu-ext", op, prefill_op=attention.PREFILL_OPS.get(op), writer=cpu_write)


def decode_key(store: KVStore, layer_id: int) -> str:
    """Kernel variant of a layer's decode: its codec pair and geometry."""
    k_codec, v_codec = store.codecs[layer_id]
    spec = store.groups[store.group_of_layer(layer_id)]
    return f"decode {k_codec.name}/{v_codec.name} d{spec.head_dim} kvh{spec.num_kv_heads}"


def _error(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class KernelGuard:
    """The engine's DecodeOp and encoder over `backend`, with the fallbacks above."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.kernels: dict[str, KernelStatus] = {}
        self.selfcheck_ms: float | None = None

    # -- state -------------------------------------------------------------------------
    def disable(self, key: str, reason: str) -> None:
        """Route `key` to the reference from now on; log one line."""
        self.kernels[key] = KernelStatus("disabled", reason)
        log.warning("%s kernel '%s' disabled, its calls use the reference path: %s",
                    self.backend.name, key, reason)

    def active_backend(self) -> str:
        """The backend name while any decode kernel is usable, else "reference"."""
        decode = [s.state for k, s in self.kernels.items() if k.startswith("decode")]
        if self.backend.decode_op is None or (decode and all(
                s in ("disabled", "declined") for s in decode)):
            return "reference"
        return self.backend.name

    def report(self) -> dict:
        """{"backend", "device_backend", "selfcheck_ms", "kernels": {key: {state, reason}}}."""
        return {"backend": self.active_backend(), "device_backend": self.backend.name,
                "selfcheck_ms": self.selfcheck_ms,
                "kernels": {k: {"state": s.state, "reason": s.reason}
                            for k, s in sorted(self.kernels.items())}}

    # -- the guarded calls ---------------------------------------------------------------
    def _guarded(self, key: str, call: Callable[[], object]):
        """call() (evaluated on a variant's first use); None when disabled, declined or
        raising."""
        status = self.kernels.get(key)
        if status is not None and status.state == "disabled":
            return None
        try:
            out = call()
            if out is not None and (status is None or status.state == "unchecked"):
                mx.eval(out)
                self.kernels[key] = KernelStatus("ok")
        except Exception as exc:  # noqa: BLE001  (any kernel failure: reference path)
            self.disable(key, f"launch error: {_error(exc)}")
            return None
        if out is None and status is None:
            self.kernels[key] = KernelStatus("declined", "not covered by the kernel")
        return out

    def decode(self, q, store: KVStore, layer_id: int, tables, seq_lens, scale, window):
        """DecodeOp: the backend's decode, or None (the reference runs) on any failure."""
        return self._guarded(decode_key(store, layer_id), lambda: self.backend.decode_op(
            q, store, layer_id, tables, seq_lens, scale, window))

    __call__ = decode  # the guard is the runner's DecodeOp

    def prefill(self, q, store: KVStore, layer_id: int, tables, batch, scale, window):
        """The backend's prefill twin (attention.PREFILL_OPS), or None (the reference runs)."""
        if self.backend.prefill_op is None:
            return None
        return self._guarded("prefill" + decode_key(store, layer_id)[len("decode"):],
                             lambda: self.backend.prefill_op(q, store, layer_id, tables, batch,
                                                             scale, window))

    def encode(self, *, x: mx.array, codec) -> dict[str, mx.array]:
        """Encoder: the backend's encode kernel, or codec.encode on any failure."""
        if not encode_supported(x, codec):
            return kv_encode_ref(x=x, codec=codec)
        out = self._guarded(f"encode {codec.name} d{x.shape[-1]}",
                            lambda: self.backend.encoder(x=x, codec=codec))
        return out if out is not None else kv_encode_ref(x=x, codec=codec)

    def write(self, *, pools, codec, slot_mapping: mx.array, x: mx.array):
        """Writer: the backend's compiled encode into the pool, or None (the store encodes
        and scatters) where it is declined, disabled or raises."""
        if self.backend.writer is None or not is_write_supported(x, codec):
            return None
        return self._guarded(f"write {codec.name} d{x.shape[-1]}",
                             lambda: self.backend.writer(pools=pools, codec=codec,
                                                         slot_mapping=slot_mapping, x=x))

    def install(self, store: KVStore) -> DecodeOp | None:
        """Route the store's encodes (and compiled writes) through the guard; the runner's
        DecodeOp (None: the reference path, as without kernels)."""
        if self.backend.encoder is not None:
            store.encoder = self.encode
        if self.backend.writer is not None:
            store.writer = self.write
        return self if self.backend.decode_op is not None else None

    # -- the start-up self-check ----------------------------------------------------------
    def run_selfcheck(self, store: KVStore, num_heads: int | None) -> None:
        """Check every decode and encode variant `store` uses (see the module docstring)."""
        start = time.perf_counter()
        seen: set[str] = set()
        for layer_id in sorted(store.codecs):
            key = decode_key(store, layer_id)
            if key in seen or self.backend.decode_op is None:
                continue
            seen.add(key)
            self._check(key, lambda lid=layer_id: self._check_decode(store, lid, num_heads))
        if self.backend.encoder is not None:
            for layer_id, pair in sorted(store.codecs.items()):
                spec = store.groups[store.group_of_layer(layer_id)]
                for codec in pair:
                    self._check_encode(codec, spec, store.dtype, seen)
        self.selfcheck_ms = round(1e3 * (time.perf_counter() - start), 1)
        log.info("kernel self-check (%s): %s in %.0f ms", self.backend.name,
                 {k: s.state for k, s in self.kernels.items()}, self.selfcheck_ms)

    def _check(self, key: str, check: Callable[[], str | None]) -> None:
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001  (compile or launch error)
            self.disable(key, f"self-check: {_error(exc)}")
            return
        if problem == "declined":
            self.kernels[key] = KernelStatus("declined", "not covered by the kernel")
        elif problem:
            self.disable(key, f"self-check: {problem}")
        else:
            self.kernels[key] = KernelStatus("ok")

    def _check_decode(self, store: KVStore, layer_id: int, num_heads: int | None) -> str | None:
        spec = store.groups[store.group_of_layer(layer_id)]
        mini = _mini_store(store, layer_id, spec)
        BS, kvh, D = store.block_size, spec.num_kv_heads, spec.head_dim
        H = num_heads or kvh
        key = mx.random.key(1)
        q = mx.random.normal((2, H, D), key=key).astype(store.dtype)
        cycle = [1 + i % (_NUM_BLOCKS - 1) for i in range(-(-513 // BS) + 1)]
        cases = {"unsplit": ([[1, 2, 3], [4, 5, 0]], [2 * BS + 5, BS + 1]),
                 "split": ([cycle, cycle[::-1]], [len(cycle) * BS - 1, 3])}
        for case, (table, lens) in cases.items():
            tables, seq_lens = mx.array(table, dtype=mx.int32), mx.array(lens, dtype=mx.int32)
            args = (q, mini, 0, tables, seq_lens, D**-0.5, spec.sliding_window)
            out = self.backend.decode_op(*args)
            if out is None:
                return "declined"
            want = reference_decode(*args)
            err = mx.max(mx.abs(out.astype(mx.float32) - want)).item()
            bound = TOLERANCE.get(q.dtype, 5e-2) * max(1.0, mx.max(mx.abs(want)).item())
            if not err <= bound:
                return f"mismatch vs reference ({case} path: max error {err:.3g} > {bound:.3g})"
        return None

    def _check_encode(self, codec, spec: KVGroupSpec, dtype, seen: set[str]) -> None:
        x = mx.random.normal((3 * spec.num_kv_heads, spec.head_dim),
                             key=mx.random.key(2)).astype(dtype)
        key = f"encode {codec.name} d{spec.head_dim}"
        if key in seen or not encode_supported(x, codec):
            return
        seen.add(key)
        self._check(key, lambda: _encode_problem(self.backend.encoder, codec, x))


def _encode_problem(encoder: Encoder, codec, x: mx.array) -> str | None:
    """None when the kernel's codes reconstruct x as well as codec.encode's (1% slack)."""
    got = encoder(x=x, codec=codec)
    want = codec.encode(x)
    err_got = mx.mean(mx.square(codec.decode(got, mx.float32) - x)).item()
    err_want = mx.mean(mx.square(codec.decode(want, mx.float32) - x)).item()
    if not err_got <= 1.01 * err_want + 1e-6:
        return f"mismatch vs codec.encode (reconstruction MSE {err_got:.3g} vs {err_want:.3g})"
    return None


def _mini_store(store: KVStore, layer_id: int, spec: KVGroupSpec) -> KVStore:
    """A _NUM_BLOCKS-block pool with the layer's geometry and codecs, filled with N(0, 1)."""
    mini_spec = KVGroupSpec((0,), spec.num_kv_heads, spec.head_dim, spec.sliding_window)
    mini = KVStore([mini_spec], [_NUM_BLOCKS], store.block_size, store.dtype,
                   {0: store.codecs[layer_id]}, encoder=kv_encode_ref)
    num_slots = (_NUM_BLOCKS - 1) * store.block_size
    shape = (num_slots, spec.num_kv_heads, spec.head_dim)
    k = mx.random.normal(shape, key=mx.random.key(3)).astype(store.dtype)
    v = mx.random.normal(shape, key=mx.random.key(4)).astype(store.dtype)
    mini.write(0, mx.arange(store.block_size, _NUM_BLOCKS * store.block_size), k, v)
    mx.eval(mini.arrays())
    return mini


def reference_decode(q, store: KVStore, layer_id: int, tables, seq_lens, scale, window):
    """fp32 decode attention over the store's decoded blocks (the twin of any DecodeOp)."""
    k, v = store.gather_blocks(layer_id, tables)  # [B, MB, BS, KVH, D]
    B, MB, BS, kvh, D = k.shape

    def heads(x):  # [B, KVH, MB * BS, D]
        return x.reshape(B, MB * BS, kvh, D).transpose(0, 2, 1, 3).astype(mx.float32)

    qg = q.astype(mx.float32).reshape(B, kvh, -1, D) * scale
    out = attend_ref(qg, heads(k), heads(v), visible_mask(seq_lens, MB * BS, window))
    return out.reshape(q.shape)


def make_kernel_guard(attention: str, verbose: bool, store: KVStore, num_heads: int | None,
                      selfcheck: bool = True) -> tuple[KernelGuard, DecodeOp | None]:
    """The engine's guard and DecodeOp; runs the self-check on accelerators unless told not."""
    guard = KernelGuard(detect_backend(attention, verbose))
    op = guard.install(store)
    if selfcheck and guard.backend.is_accelerator:
        guard.run_selfcheck(store, num_heads)
    return guard, op
