"""BlockTable: one request's block ids in one layer group, as a growable int32 array.

The cache manager appends the block ids each allocation brings and edits entries in
place (a COW swaps the tail, a sliding window nulls the head); a step reads the table
as a numpy view and computes its slots vectorised, so no table is rebuilt per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class BlockTable:
    """One request's block ids in one group: a growable int32 array (amortised O(1) append).

    Behaves as a list of ints for the control plane; `view()` is the live numpy prefix.
    """

    __slots__ = ("_buf", "_len")

    def __init__(self, block_ids: Iterable[int] = ()):
        ids = np.asarray(list(block_ids), dtype=np.int32)
        self._buf = np.zeros(max(16, 2 * len(ids)), dtype=np.int32)
        self._buf[: len(ids)] = ids
        self._len = len(ids)

    def view(self) -> np.ndarray:
        """The table as an int32 array (a view: valid until the table next changes)."""
        return self._buf[: self._len]

    def append(self, block_id: int) -> None:
        if self._len == len(self._buf):
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[self._len] = block_id
        self._len += 1

    def pop(self) -> int:
        self._len -= 1
        return int(self._buf[self._len])

    def copy(self) -> BlockTable:
        return BlockTable(self.view())

    def tolist(self) -> list[int]:
        return self.view().tolist()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.view()[index].tolist()
        return int(self._buf[self._index(index)])

    def __setitem__(self, index: int, block_id: int) -> None:
        self._buf[self._index(index)] = block_id

    def _index(self, index: int) -> int:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"block table index {index} out of range ({self._len})")
        return index

    def __iter__(self) -> Iterator[int]:
        return iter(self.tolist())

    def __reversed__(self) -> Iterator[int]:
        return reversed(self.tolist())
