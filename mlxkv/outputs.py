"""What the engine emits per request and step: incremental deltas, final with a finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of one sampled token plus its top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """One delta of one request's (or one fork's, `index`) generation.

    `new_token_ids`/`new_text` hold only what is new since the previous delta. The last
    delta of a stream has `finished=True` and a `finish_reason` in
    {"stop", "length", "abort", "error"}; on "error", `error` holds the message.
    """

    request_id: str
    index: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None
    num_draft_tokens: int = 0  # speculative draft tokens verified so far
    num_accepted_tokens: int = 0  # of which accepted
