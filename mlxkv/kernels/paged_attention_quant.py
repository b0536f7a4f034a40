"""Paged decode attention over compressed K/V blocks (codes decoded inside the kernel).

Triad: `paged_attention_quant_kernel` (metal/paged_attention_quant.metal + the split combine,
which also un-rotates V for lattice codecs), `paged_attention_quant_ref` (decode through the
codec, then the reference attention) and the `paged_attention_quant` dispatcher.

Pools are the KVStore component dicts of one layer:
    affine (AffineCodec int4/int8, group 64): {"q": [NB,BS,KVH,D*bits/32] uint32,
                                               "scales"/"biases": [NB,BS,KVH,D/64] float16}
    lattice (LatticeCodec e8/d4, m = 2..4):    {"codes": [NB,BS,KVH,D/8*m] uint8,
                                               "scale": [NB,BS,KVH,1] float16}
Every layout stores exactly `bits` bytes per 8 coordinates, which is what the kernel reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx

from mlxkv.codec.affine import AffineCodec
from mlxkv.codec.base import KVCodec
from mlxkv.codec.lattice import LatticeCodec
from mlxkv.codec.rotation import rotation_matrix
from mlxkv.kernels._hadamard import rotation_signs
from mlxkv.kernels._source import (
    KernelLaunch,
    is_metal_available,
    log_fallback_once,
    make_spec,
    run_metal,
)
from mlxkv.kernels.paged_attention import (
    SUPPORTED_HEAD_DIMS,
    TG_LIMIT_BYTES,
    attend_ref,
    check_tables,
    default_num_splits,
    threadgroup_bytes,
    visible_mask,
)
from mlxkv.kernels.paged_attention_combine import paged_attention_combine_kernel

Executor = Callable[[KernelLaunch], list[mx.array]]
Pools = Mapping[str, mx.array]
AFFINE, E8, D4 = 0, 1, 2
KERNEL_LATTICE_BITS = (2, 3, 4)
_TG_FLOATS = 6144  # tg_q + merge buffer floats (24 KiB of Metal's 32 KiB)


def _spec():
    return make_spec("mlxkv_paged_attention_quant",
                     ("queries", "k_codes", "k_scales", "k_biases", "v_codes", "v_scales",
                      "v_biases", "k_signs", "block_tables", "seq_lens", "params", "scale"),
                     ("o_part", "lse_part"), "paged_attention_quant.metal")


def codec_kind(codec: KVCodec) -> tuple[int, int] | None:
    """(kernel codec id, bits) for codecs the kernel decodes, else None."""
    # NOTE: the Metal decode handles affine 4/8 and lattice m = 2..4 (32-bit block words);
    # other rates (int6, e8m5..8) fall back to the reference path instead of mis-decoding.
    if isinstance(codec, AffineCodec) and codec.group_size == 64 and codec.bits in (4, 8):
        return AFFINE, codec.bits
    if isinstance(codec, LatticeCodec) and codec.bits in KERNEL_LATTICE_BITS:
        return (E8 if codec.lattice == "e8" else D4), codec.bits
    return None


def _components(pool: Pools, codec: KVCodec, head_dim: int):
    """(codes as uint8 [..., D*bits/8], scales f16, biases f16 (>= 8 elements), signs|None)."""
    if isinstance(codec, AffineCodec):
        return pool["q"].view(mx.uint8), pool["scales"], pool["biases"], None
    signs = rotation_signs(rotation_matrix(head_dim, codec.seed))
    return pool["codes"], pool["scale"], mx.zeros((8,), dtype=mx.float16), signs


def simdgroups_for(gqa: int, head_dim: int) -> int:
    """Simdgroups per threadgroup so tg_q + the merge buffer stay within _TG_FLOATS."""
    return max(1, min(4, _TG_FLOATS // (gqa * head_dim) - 1))


def fits_threadgroup(gqa: int, head_dim: int) -> bool:
    """True when one threadgroup's tg_q + merge buffers fit Metal's 32 KiB."""
    nsg = simdgroups_for(gqa, head_dim)
    return threadgroup_bytes(gqa, head_dim, nsg, rotated_query=True) <= TG_LIMIT_BYTES


def pool_kv_heads(pool: Pools) -> int:
    """KV heads of a component dict ([NB, BS, KVH, *] every component)."""
    return next(iter(pool.values())).shape[2]


def is_kernel_supported(queries: mx.array, k_codec: KVCodec, v_codec: KVCodec,
                        num_kv_heads: int) -> bool:
    """True when the kernel decodes both codecs at this head_dim, dtype and GQA ratio."""
    D = queries.shape[-1]
    return (D in SUPPORTED_HEAD_DIMS and codec_kind(k_codec) is not None
            and codec_kind(v_codec) is not None
            and queries.dtype in (mx.float32, mx.float16, mx.bfloat16)
            and fits_threadgroup(queries.shape[1] // max(1, num_kv_heads), D))


def plan_paged_attention_quant(*, queries, k_pool: Pools, v_pool: Pools, k_codec: KVCodec,
                               v_codec: KVCodec, block_tables, seq_lens, scale: float,
                               sliding_window: int | None = None,
                               num_splits: int | None = None) -> tuple[KernelLaunch, mx.array | None]:
    """Launch plan of the attention pass, plus the V rotation signs (None: V not rotated)."""
    if not is_kernel_supported(queries, k_codec, v_codec, pool_kv_heads(k_pool)):
        raise ValueError(f"unsupported codecs/head_dim/GQA for the kernel: {k_codec.name}, "
                         f"{v_codec.name}, D={queries.shape[-1]} (or > 32 KiB threadgroup "
                         "memory)")
    B, H, D = queries.shape
    kc, vc = _components(k_pool, k_codec, D), _components(v_pool, v_codec, D)
    if kc[0].ndim != 4 or kc[0].shape[:3] != vc[0].shape[:3]:
        raise ValueError(f"K/V code pools [NB,BS,KVH,*] disagree: {kc[0].shape} {vc[0].shape}")
    kvh = kc[0].shape[2]
    gqa = check_tables(queries, kvh, block_tables, seq_lens)
    BS, MB = kc[0].shape[1], block_tables.shape[1]
    splits = num_splits or default_num_splits(MB * BS)
    nsg = simdgroups_for(gqa, D)  # the support check above guaranteed the fit
    (k_id, k_bits), (v_id, v_bits) = codec_kind(k_codec), codec_kind(v_codec)
    k_signs = kc[3] if kc[3] is not None else mx.ones((D,), dtype=mx.float32)
    params = mx.array([MB, sliding_window or 0, splits, 0], dtype=mx.int32)
    launch = KernelLaunch(
        spec=_spec(),
        inputs=[queries, kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], k_signs, block_tables,
                seq_lens, params, mx.array([scale], dtype=mx.float32)],
        template=[("T", queries.dtype), ("D", D), ("BS", BS), ("KVH", kvh), ("G", gqa),
                  ("NSG", nsg), ("KC", k_id), ("KB", k_bits), ("VC", v_id), ("VB", v_bits)],
        grid=(32 * nsg, kvh, B * splits), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(B, splits, H, D), (B, splits, H)],
        output_dtypes=[mx.float32, mx.float32])
    return launch, vc[3]


def paged_attention_quant_kernel(*, queries, k_pool: Pools, v_pool: Pools, k_codec: KVCodec,
                                 v_codec: KVCodec, block_tables, seq_lens, scale: float,
                                 sliding_window: int | None = None,
                                 num_splits: int | None = None,
                                 executor: Executor = run_metal) -> mx.array:
    """Kernel path -> [B, H, D] in the query dtype (`executor`: Metal or the test emulator)."""
    launch, v_signs = plan_paged_attention_quant(
        queries=queries, k_pool=k_pool, v_pool=v_pool, k_codec=k_codec, v_codec=v_codec,
        block_tables=block_tables, seq_lens=seq_lens, scale=scale,
        sliding_window=sliding_window, num_splits=num_splits)
    o_part, lse_part = executor(launch)
    if o_part.shape[1] == 1 and v_signs is None:
        return o_part[:, 0].astype(queries.dtype)
    return paged_attention_combine_kernel(o_part=o_part, lse_part=lse_part, dtype=queries.dtype,
                                          signs=v_signs, executor=executor)


def gather_decoded(pool: Pools, codec: KVCodec, block_tables: mx.array) -> mx.array:
    """Decode every table block: [B, KVH, MB * BS, D] float32 (the reference's K or V)."""
    gathered = {name: comp[block_tables] for name, comp in pool.items()}  # [B, MB, BS, KVH, *]
    x = codec.decode(gathered, mx.float32)
    B, MB, BS, KVH, D = x.shape
    return x.reshape(B, MB * BS, KVH, D).transpose(0, 2, 1, 3)


def paged_attention_quant_ref(*, queries, k_pool: Pools, v_pool: Pools, k_codec: KVCodec,
                              v_codec: KVCodec, block_tables, seq_lens, scale: float,
                              sliding_window: int | None = None,
                              num_splits: int | None = None) -> mx.array:
    """Pure-mx twin: codec.decode of the gathered blocks, then the reference attention."""
    B, H, D = queries.shape
    k = gather_decoded(k_pool, k_codec, block_tables)
    v = gather_decoded(v_pool, v_codec, block_tables)
    kvh = k.shape[1]
    q = queries.astype(mx.float32).reshape(B, kvh, H // kvh, D) * scale
    out = attend_ref(q, k, v, visible_mask(seq_lens, k.shape[2], sliding_window))
    return out.reshape(B, H, D).astype(queries.dtype)


def paged_attention_quant(*, queries, k_pool: Pools, v_pool: Pools, k_codec: KVCodec,
                          v_codec: KVCodec, block_tables, seq_lens, scale: float,
                          sliding_window: int | None = None,
                          num_splits: int | None = None) -> mx.array:
    """Dispatcher: the kernel on Metal for affine/lattice codecs, else the reference."""
    kwargs = dict(queries=queries, k_pool=k_pool, v_pool=v_pool, k_codec=k_codec,
                  v_codec=v_codec, block_tables=block_tables, seq_lens=seq_lens, scale=scale,
                  sliding_window=sliding_window, num_splits=num_splits)
    if is_metal_available() and is_kernel_supported(queries, k_codec, v_codec,
                                                    pool_kv_heads(k_pool)):
        return paged_attention_quant_kernel(**kwargs)
    log_fallback_once("paged_attention_quant", "no Metal device or unsupported codec")
    return paged_attention_quant_ref(**kwargs)
