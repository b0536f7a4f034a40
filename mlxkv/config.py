"""Engine configuration: frozen dataclasses validated on construction.

`EngineConfig.from_args` is the only place argparse touches configuration and
`EngineConfig.from_env` the only place environment variables are read. Components get the
narrowest config they need (`CacheConfig`, `SchedulerConfig`, ...).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def _check(cond: bool, name: str, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}")


# Step time by query rows, relative to a one-row step: SmolLM2-135M fp32 decoding at a
# 256..600-token context on 2 AMD EPYC cores with the compiled small-M linear (up to 24
# rows; MLX's matmul above, hence the jump at 25), from benchmarks/bench_speculative.py
# (row_cost) on the idle and on the loaded machine (docs/speculative.md, Sizing).
CPU_STEP_COST: tuple[tuple[int, float], ...] = (
    (1, 1.0), (2, 1.1), (4, 1.35), (8, 2.1), (16, 2.75), (24, 3.25), (25, 4.4), (32, 4.6),
    (40, 5.5), (64, 8.2), (72, 8.8))


def roofline_cost(free_rows: float) -> tuple[tuple[int, float], ...]:
    """A `SpeculativeConfig.step_cost` curve for the roofline idealisation: rows up to
    `free_rows` cost one step (memory-bound), each further row 1 / free_rows of one."""
    top = int(free_rows)
    flat = ((top, 1.0),) if top > 1 else ()
    return ((1, 1.0), *flat, (top + 1, (top + 1) / free_rows))


def _check_step_cost(curve: tuple[tuple[int, float], ...]) -> None:
    rows = [r for r, _ in curve]
    costs = [c for _, c in curve]
    increasing = all(a < b for a, b in zip(rows, rows[1:], strict=False))
    monotone = all(a <= b for a, b in zip(costs, costs[1:], strict=False))
    _check(len(curve) >= 1 and rows[0] >= 1 and increasing and costs[0] > 0 and monotone,
           "step_cost", "knots (rows, relative time) with rows >= 1 increasing and times > 0 "
           "not decreasing")


def default_cache_dir() -> Path:
    """Where converted models and other generated files live (never in the repo)."""
    env = os.environ.get("MLXKV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxkv"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to load and how.

    `model` is a local MLX/HF folder, a .gguf file, a Hugging Face repo id, or the name of an
    embedded model; None means the embedded default (SmolLM2-135M-Instruct).
    `dtype` None means float32 on CPU and the checkpoint's dtype elsewhere.
    """

    model: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.dtype in (None, "float32", "float16", "bfloat16"),
            "dtype",
            "float32, float16 or bfloat16",
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache geometry and budget.

    The pool holds `num_blocks` blocks per layer group when given; otherwise the number is
    derived from `memory_budget_bytes`, or on Metal from `memory_fraction` of the device's
    recommended working set, or on CPU from `cpu_default_budget_bytes`.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_budget_bytes: int | None = None
    memory_fraction: float = 0.5
    cpu_default_budget_bytes: int = 1 << 30
    kv_codec: str = "auto"
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            "block_size",
            "a power of two in 1..128",
        )
        _check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks", ">= 2 or None")
        _check(
            self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
            "memory_budget_bytes",
            "> 0 or None",
        )
        _check(0.0 < self.memory_fraction <= 0.95, "memory_fraction", "in (0, 0.95]")
        _check(bool(self.kv_codec), "kv_codec", "a codec name")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous-batching limits.

    `max_num_batched_tokens` is the per-step token budget (prefill chunks + decodes);
    `max_model_len` None means the model's own context length; `max_waiting` bounds the
    queue (beyond it new requests are refused with EngineOverloadedError -> HTTP 429).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    max_waiting: int = 256

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1")
        _check(
            self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1 or None"
        )
        _check(self.max_waiting >= 1, "max_waiting", ">= 1")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP surface settings. Binds loopback by default."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_tokens_limit: int = 32768
    max_n: int = 16
    max_stop: int = 16
    log_prompts: bool = False

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", "in 0..65535")
        _check(self.max_n >= 1, "max_n", ">= 1")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (mlxkv.speculative). `method` "off" (the default), "ngram"
    (prompt lookup) or "draft" (a draft model) is what requests that do not set
    `SamplingParams.speculative` get; a request that opts in under "off" gets prompt lookup.

    `num_speculative_tokens` caps the drafts per request and step; `ngram_min`/`ngram_max`
    bound the n-gram sizes matched; `step_cost` is the step-time curve the sizing
    maximises expected tokens per second over: knots (query rows, time of a step with that
    many rows relative to a one-row step), linear between knots and beyond the last along
    the last segment (mlxkv.speculative; the default is SmolLM2 on this 2-core CPU with the
    compiled small-M linear, `roofline_cost` builds the memory-bound/compute-bound
    idealisation); `acceptance_decay` weighs the acceptance history of a request.

    Method "draft" (mlxkv.draft_model): `draft_model` names the draft (what `--model`
    accepts; it must share the target's vocabulary), `draft_layers` keeps only its first
    L layers (an early-exit draft: SmolLM2 drafting for itself), and `draft_cost` is one
    draft step's time relative to one target step (None: the ratio of their parameter
    counts), which the sizing charges for every draft position.
    """

    method: str = "off"
    num_speculative_tokens: int = 8
    ngram_min: int = 2
    ngram_max: int = 4
    step_cost: tuple[tuple[int, float], ...] = CPU_STEP_COST
    acceptance_decay: float = 0.8
    draft_model: str | None = None
    draft_layers: int | None = None
    draft_cost: float | None = None

    def __post_init__(self) -> None:
        _check(self.method in ("off", "ngram", "draft"), "speculative",
               "'off', 'ngram' or 'draft'")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("--speculative draft needs a draft model: pass --draft-model "
                             "NAME_OR_PATH (a model sharing the target's tokenizer)")
        if self.draft_model and self.method != "draft":
            raise ValueError("--draft-model is only used with --speculative draft")
        if self.draft_layers is not None and not self.draft_model:
            raise ValueError("--draft-layers needs --draft-model")
        _check(self.draft_layers is None or self.draft_layers >= 1, "draft_layers",
               ">= 1 or None")
        _check(self.draft_cost is None or self.draft_cost >= 0, "draft_cost", ">= 0 or None")
        _check(1 <= self.num_speculative_tokens <= 15, "num_speculative_tokens", "in 1..15")
        _check(1 <= self.ngram_min <= self.ngram_max, "ngram_min", "in 1..ngram_max")
        _check_step_cost(self.step_cost)
        _check(0.0 <= self.acceptance_decay < 1.0, "acceptance_decay", "in [0, 1)")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs, composed of the narrower configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int = 0
    kernel_verbose: bool = False
    attention: str = "auto"  # "auto": fused kernels (Metal, or mlxkv._ext on CPU); "reference"
    kernel_selfcheck: bool = True  # check each accelerator kernel against its twin at start-up
    linear: str = "auto"  # "auto": decode matmuls via mlxkv._ext on CPU; "reference": MLX's

    def __post_init__(self) -> None:
        _check(self.attention in ("auto", "reference"), "attention", "'auto' or 'reference'")
        _check(self.linear in ("auto", "reference"), "linear", "'auto' or 'reference'")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register the engine flags shared by `mlxkv generate|serve|bench`."""
        g = parser.add_argument_group("engine")
        g.add_argument(
            "--model",
            default=None,
            help=f"local folder, .gguf file, HF repo id or embedded name (default: {DEFAULT_MODEL})",
        )
        g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
        g.add_argument("--cache-dir", default=None, help="where converted models are kept")
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--num-blocks", type=int, default=None)
        g.add_argument("--kv-memory", type=int, default=None, help="KV pool budget in bytes")
        g.add_argument(
            "--kv-codec", default="auto", help="auto, fp16, fp32, int8, int4, e8:k4v3, d4:k4v3, ..."
        )
        g.add_argument("--no-prefix-caching", action="store_true")
        g.add_argument("--max-num-seqs", type=int, default=32)
        g.add_argument("--max-num-batched-tokens", type=int, default=512)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--no-kernel-selfcheck", action="store_true",
                       help="skip the start-up check of the accelerator kernels")
        g.add_argument("--speculative", default="off", choices=["off", "ngram", "draft"],
                       help="speculative decoding for requests that do not choose: off "
                            "(default), ngram (prompt lookup) or draft (--draft-model)")
        g.add_argument("--num-speculative-tokens", type=int, default=8,
                       help="most draft tokens verified per request and step")
        g.add_argument("--draft-model", default=None,
                       help="draft model for --speculative draft (what --model accepts; "
                            "same tokenizer as the target)")
        g.add_argument("--draft-layers", type=int, default=None,
                       help="use only the draft model's first N layers (early exit; "
                            "e.g. --draft-model smollm2-135m-instruct --draft-layers 8)")
        g.add_argument("--draft-cost", type=float, default=None,
                       help="a draft step's time relative to a target step, for sizing "
                            "drafts (default: the ratio of their parameter counts)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> EngineConfig:
        """Build a config from parsed CLI flags (the only place argparse meets config)."""
        get = lambda name, default=None: getattr(ns, name, default)  # noqa: E731
        base = cls.from_env()
        return replace(
            base,
            model=ModelConfig(
                model=get("model"),
                dtype=get("dtype"),
                cache_dir=get("cache_dir") or base.model.cache_dir,
                served_model_name=get("served_model_name"),
            ),
            cache=CacheConfig(
                block_size=get("block_size", 16),
                num_blocks=get("num_blocks"),
                memory_budget_bytes=get("kv_memory"),
                kv_codec=get("kv_codec", "auto"),
                enable_prefix_caching=not get("no_prefix_caching", False),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=get("max_num_seqs", 32),
                max_num_batched_tokens=get("max_num_batched_tokens", 512),
                max_model_len=get("max_model_len"),
            ),
            server=ServerConfig(
                host=get("host", "127.0.0.1"),
                port=get("port", 8000),
                api_key=get("api_key"),
                log_prompts=get("log_prompts", False),
            ),
            speculative=SpeculativeConfig(
                method=get("speculative", "off"),
                num_speculative_tokens=get("num_speculative_tokens", 8),
                draft_model=get("draft_model"),
                draft_layers=get("draft_layers"),
                draft_cost=get("draft_cost"),
            ),
            seed=get("seed", 0),
            kernel_selfcheck=base.kernel_selfcheck and not get("no_kernel_selfcheck", False),
        )

    @classmethod
    def from_env(cls) -> EngineConfig:
        """Defaults overlaid with environment variables (the only place env is read)."""
        return cls(
            model=ModelConfig(cache_dir=os.environ.get("MLXKV_CACHE_DIR")),
            kernel_verbose=os.environ.get("MLXKV_KERNEL_VERBOSE", "0") == "1",
            attention=os.environ.get("MLXKV_ATTENTION", "auto"),
            kernel_selfcheck=os.environ.get("MLXKV_KERNEL_SELFCHECK", "1") != "0",
            linear=os.environ.get("MLXKV_LINEAR", "auto"),
        )
