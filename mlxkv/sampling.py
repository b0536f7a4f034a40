"""User-facing sampling parameters (validated) and, later, the pure samplers over mx.array.

`SamplingParams` is shared by the engine (which samples) and the server (which builds it
from OpenAI requests). Validation raises InvalidRequestError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxkv.errors import InvalidRequestError


def _require(cond: bool, param: str, message: str) -> None:
    if not cond:
        raise InvalidRequestError(f"{param} {message}", param=param)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request.

    Guarantees: a constructed instance is valid; `temperature == 0` means greedy;
    `top_k == 0` and `top_p == 1` and `min_p == 0` disable those filters; `logprobs`
    None means no logprobs, k >= 0 means the chosen token's logprob plus k alternatives;
    `max_tokens` None means "until the context is full"; `json_schema` None means
    unconstrained, else every generated token keeps the output a prefix of a JSON document
    matching that schema (mlxkv.structured; the schema is checked when the request is added).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    json_schema: str | None = None  # JSON Schema text the output must match (mlxkv.structured)
    speculative: bool | None = None  # None: the engine's default (--speculative)

    def __post_init__(self) -> None:
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _require(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)")
        _require(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _require(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _require(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _require(
            self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"
        )
        _require(self.n >= 1, "n", "must be >= 1")
        _require(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        _require(self.speculative in (None, True, False), "speculative",
                 "must be true, false or null")
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be token ids >= 0",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
