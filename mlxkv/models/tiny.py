"""Random-weight tiny models of mlx-lm architectures (seam coverage, quick benchmarks).

The model classes are mlx-lm's own, built from a small config; weights are seeded normal
draws in float32. They know no tokenizer: drive them with token ids.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map

_BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

TINY_CONFIGS = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1},
    "qwen3": {"model_type": "qwen3", "num_attention_heads": 6},
    "gemma3_text": {
        "model_type": "gemma3_text", "num_hidden_layers": 4, "num_key_value_heads": 1,
        "sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
    },
    "gemma2": {"model_type": "gemma2", "query_pre_attn_scalar": 16},
}


def make_tiny_model(arch: str, *, seed: int = 0, **overrides):
    """A float32 mlx-lm model of architecture `arch` with small random weights."""
    from mlx_lm.utils import _get_classes

    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r} (have {', '.join(TINY_CONFIGS)})")
    config = {**_BASE, **TINY_CONFIGS[arch], **overrides}
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.random.seed(seed)
    params = tree_map(lambda p: (mx.random.normal(p.shape) * 0.08).astype(mx.float32),
                      model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    return model
