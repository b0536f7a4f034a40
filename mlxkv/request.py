"""Request: one sequence's token ids, progress counters and status (no arrays, no blocks).

    token_ids = prompt_token_ids + output_token_ids
    |<------ num_computed_tokens ------>|<- scheduled this step ->|
    the last output token is never computed yet: it is the next step's input.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from mlxkv.sampling import SamplingParams
from mlxkv.speculative import SpecState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    """A sequence the engine generates for. Forks of an n>1 request have their own Request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    user_id: str = ""  # the id the caller knows (forks share it)
    index: int = 0  # fork index for n > 1
    max_total_tokens: int = 1 << 30  # prompt + output never exceeds this (max_model_len)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    error: str | None = None
    forked: bool = False  # n > 1: children created after prefill
    seed: int = 0  # sampling seed (params.seed or one drawn by the engine)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts for the next step
    spec: SpecState = field(default_factory=SpecState)  # speculation counters

    def __post_init__(self) -> None:
        self.user_id = self.user_id or self.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (the whole prompt at first, 1 when decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
