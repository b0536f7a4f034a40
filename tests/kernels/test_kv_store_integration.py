"""The kernels read KVStore pools as they really are (layout, component names, codecs)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from _data import max_err

from mlxkv.codec import get_codec
from mlxkv.kernels import paged_attention_kernel, paged_attention_quant_kernel
from mlxkv.kv_spec import KVGroupSpec
from mlxkv.kv_store import KVStore


@pytest.mark.parametrize("codecs", [None, ("int8", "int4"), ("e8m4", "e8m3"), ("d4m3", "d4m2")])
def test_kernel_on_written_store_matches_dense_attention(codecs, emulator):
    D, KVH, G, BS = 64, 2, 3, 16
    pair = None if codecs is None else {0: (get_codec(codecs[0], 0), get_codec(codecs[1], 1))}
    store = KVStore([KVGroupSpec((0,), KVH, D)], [8], BS, mx.float32, pair)
    rng = np.random.default_rng(0)
    tables = np.array([[3, 5, 0], [6, 2, 7]], dtype=np.int32)
    lens = [20, 40]
    for b, length in enumerate(lens):
        slots = mx.array([int(tables[b, t // BS]) * BS + t % BS for t in range(length)],
                         mx.int32)
        k = mx.array(rng.standard_normal((length, KVH, D)).astype(np.float32))
        v = mx.array(rng.standard_normal((length, KVH, D)).astype(np.float32))
        store.write(0, slots, k, v)
    q = mx.array(rng.standard_normal((2, KVH * G, D)).astype(np.float32))
    args = dict(queries=q, block_tables=mx.array(tables), seq_lens=mx.array(lens, mx.int32),
                scale=D**-0.5, num_splits=2, executor=emulator)
    if codecs is None:
        out = paged_attention_kernel(k_pool=store.k_pool(0)["x"], v_pool=store.v_pool(0)["x"],
                                     **args)
    else:
        out = paged_attention_quant_kernel(k_pool=store.k_pool(0), v_pool=store.v_pool(0),
                                           k_codec=pair[0][0], v_codec=pair[0][1], **args)
    for b, length in enumerate(lens):
        k, v = store.gather(0, tables[b].tolist(), length)  # decoded [L, KVH, D]
        dense = mx.fast.scaled_dot_product_attention(
            q[b][None, :, None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
            scale=D**-0.5)
        assert max_err(out[b], dense[0, :, 0]) < 5e-5
