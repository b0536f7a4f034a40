"""Tiny models of mlx-lm architectures whose output depends on which K/V they read.

The model classes are mlx-lm's own, built from a small config, in float32. They know no
tokenizer: drive them with token ids. Weights are seeded draws scaled so that the model
is *sharp* (the oracles in tests/ rely on it):

  * every norm is the identity (weight 1, or 0 where the architecture adds 1), except
    that tied gemma models scale their sublayer outputs and final norm up (so a token's
    own embedding does not dominate its logits and greedy output does not echo itself);
  * output heads are untied where the architecture allows it (tied heads echo the input);
  * q/k projections (or the q/k norms) carry a gain so attention logits have a standard
    deviation of about `QK_GAIN**2` (~6): each query attends to a few keys, not all;
  * every other matrix keeps activations at unit scale (std 1/sqrt(fan_in)), and logits
    have a spread of several nats, so greedy choices have clear margins.

With small N(0, 0.08) weights (what this module used to draw) attention was nearly
uniform and greedy output barely depended on context: a shifted causal mask or a prefix
hit serving another prompt's K/V left the ids unchanged. Here both move the logits by
whole units (tests/engine/test_sharp_models.py proves it).
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

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
    "tie_word_embeddings": False,
}

TINY_CONFIGS = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1},
    "qwen3": {"model_type": "qwen3", "num_attention_heads": 6},
    "gemma3_text": {
        "model_type": "gemma3_text", "num_hidden_layers": 4, "num_key_value_heads": 1,
        "sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
    },
    "gemma2": {"model_type": "gemma2", "query_pre_attn_scalar": 16},
}

QK_GAIN = 2.5  # per-coordinate scale of q and k: attention logits ~ N(0, QK_GAIN**4)


def _is_gemma(model_type: str) -> bool:
    return model_type.startswith("gemma")  # RMSNorm scales by (1 + weight)


def _init(name: str, shape, gemma: bool, hidden: int, tied: bool) -> mx.array:
    """A sharp draw for the parameter `name` (see the module docstring)."""
    if name == "model.norm.weight" and gemma and tied:  # embeddings ~1/sqrt(hidden): undo it
        return mx.full(shape, math.sqrt(hidden) - 1.0)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return mx.full(shape, QK_GAIN - 1.0 if gemma else QK_GAIN)
    if gemma and tied and name.endswith(("post_attention_layernorm.weight",
                                         "post_feedforward_layernorm.weight")):
        return mx.full(shape, 2.0)  # sublayers outweigh the tied embedding: no self-echo
    if name.endswith("norm.weight"):
        return mx.full(shape, 0.0 if gemma else 1.0)
    if name.endswith("bias"):
        return mx.random.normal(shape) * 0.1
    if name.endswith("embed_tokens.weight"):  # gemma multiplies embeddings by sqrt(hidden)
        return mx.random.normal(shape) * (1.0 / math.sqrt(hidden) if gemma else 1.0)
    if name.endswith("lm_head.weight"):
        return mx.random.normal(shape)
    std = 1.0 / math.sqrt(shape[-1])
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        std *= QK_GAIN
    return mx.random.normal(shape) * std


def make_tiny_model(arch: str, *, seed: int = 0, **overrides):
    """A sharp float32 mlx-lm model of architecture `arch` (seeded; see the module docstring)."""
    from mlx_lm.utils import _get_classes

    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r} (have {', '.join(TINY_CONFIGS)})")
    config = {**_BASE, **TINY_CONFIGS[arch], **overrides}
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    gemma = _is_gemma(config["model_type"])
    mx.random.seed(seed)
    flat = tree_flatten(model.parameters())
    tied = all(name != "lm_head.weight" for name, _ in flat)
    params = [(name, _init(name, p.shape, gemma, config["hidden_size"], tied).astype(mx.float32))
              for name, p in flat]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model
