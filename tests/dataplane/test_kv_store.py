"""KVStore: slots written read back bit-exactly through block tables; COW copies move data."""

from __future__ import annotations

import mlx.core as mx

from mlxkv.kv_spec import make_group_specs
from mlxkv.kv_store import KVStore

GROUPS = make_group_specs([None, None, 4], [2, 2, 1], [8, 8, 16])


def store():
    return KVStore(GROUPS, [6, 5], block_size=4, dtype=mx.float32)


def test_geometry_and_bytes():
    s = store()
    assert s.k_pool(0)["x"].shape == (6, 4, 2, 8)
    assert s.v_pool(2)["x"].shape == (5, 4, 1, 16)
    assert s.group_of_layer(2) == 1
    assert s.bytes_per_block(0) == 2 * 2 * 4 * 2 * 8 * 4  # layers * (k, v) * bs * kvh * d * 4
    assert s.nbytes == 2 * 2 * 6 * 4 * 2 * 8 * 4 + 2 * 5 * 4 * 16 * 4


def test_written_slots_read_back_bit_exactly():
    s = store()
    table = [3, 1, 5]
    positions = list(range(10))
    slots = mx.array([table[p // 4] * 4 + p % 4 for p in positions], dtype=mx.int32)
    k = mx.random.normal((10, 2, 8))
    v = mx.random.normal((10, 2, 8))
    s.write(1, slots, k, v)
    k2, v2 = s.gather(1, table, 10)
    assert mx.array_equal(k2, k).item() and mx.array_equal(v2, v).item()
    k0, _ = s.gather(0, table, 10)  # other layers untouched
    assert not mx.any(k0).item()


def test_copy_blocks_moves_the_right_data():
    s = store()
    k = mx.random.normal((4, 2, 8))
    slots = mx.array([8, 9, 10, 11], dtype=mx.int32)  # block 2
    s.write(0, slots, k, k * 2)
    s.copy_blocks(0, [(2, 4)])
    k4, v4 = s.gather(0, [4], 4)
    assert mx.array_equal(k4, k).item() and mx.array_equal(v4, k * 2).item()
    k2, _ = s.gather(0, [2], 4)
    assert mx.array_equal(k2, k).item()  # the source is intact
    assert not mx.any(s.gather(0, [3], 4)[0]).item()
