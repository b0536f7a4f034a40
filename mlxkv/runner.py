"""ModelRunner: one forward of an mlx-lm model over a BatchInputs -> logits of sampled rows."""

from __future__ import annotations

import mlx.core as mx

from mlxkv.attention import DecodeOp
from mlxkv.inputs import BatchInputs
from mlxkv.kv_store import KVStore
from mlxkv.models import adapter
from mlxkv.models.linear_seam import select_linear


class ModelRunner:
    """Owns the model and the store; knows nothing of requests or the scheduler."""

    def __init__(self, model, store: KVStore, decode_op: DecodeOp | None = None,
                 linear: str = "auto"):
        """`decode_op`: fused decode attention (attention.default_decode_op()), or None.
        `linear`: "auto" runs decode-shaped matmuls through the compiled small-M linear
        where it applies (models/linear_seam.py), "reference" keeps MLX's matmul."""
        adapter.check_supported(model)
        adapter.install_seam()
        self.model = model  # as loaded: mlx-lm code sharing it keeps its own matmuls
        # What forward runs: `model`, or a view of it with routed linears (same weights).
        self.net, self.linear = select_linear(model, linear)
        self.store = store
        self.windows = adapter.layer_windows(model)
        self.decode_op = decode_op

    def forward(self, batch: BatchInputs) -> mx.array:
        """fp32 logits [num_sampling_seqs, vocab] (lazy; the store's writes are in the graph)."""
        return adapter.paged_forward(self.net, self.store, batch, self.windows,
                                     self.decode_op)

    def forward_hidden(self, batch: BatchInputs) -> mx.array:
        """Final hidden states [num_sampling_seqs, hidden_size] (lazy): `forward` without the
        LM head, for callers that score many rows in slices (`logits_of`)."""
        return adapter.paged_hidden(self.model, self.store, batch, self.windows,
                                    self.decode_op)

    def logits_of(self, hidden: mx.array) -> mx.array:
        """fp32 logits [rows, vocab] of final hidden states [rows, hidden_size] (lazy)."""
        return adapter.logits_of(self.model, hidden)

    def copy_blocks(self, cow_copies: list[list[tuple[int, int]]]) -> None:
        """Apply an allocation's per-group COW copies before the step's writes."""
        for group_id, pairs in enumerate(cow_copies):
            self.store.copy_blocks(group_id, pairs)
