"""Request: one sequence's token ids, progress counters and status (no arrays, no blocks).

    token_ids = prompt_token_ids + output_token_ids          (append-only, one list)
    |<------ num_computed_tokens ------>|<- scheduled this step ->|
                                                         |<- in flight ->|
    the last sampled token is never computed yet: it is the next step's input. While a
    step evaluates, its sampled token is *in flight*: counted in `num_tokens` (so the next
    step can be scheduled and its input read on the device) but not yet in `token_ids`.

Writers: the scheduler sets `status` and `num_preemptions`; the output processor
(mlxkv/output_processor.py) writes everything else that moves: progress, tokens, stops.
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


@dataclass(eq=False)
class Request:
    """A sequence the engine generates for. Forks of an n>1 request have their own Request.

    Compared by identity (eq=False): the queues test membership, and a field-by-field
    comparison would compare whole token lists.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    user_id: str = ""  # the id the caller knows (forks share it)
    index: int = 0  # fork index for n > 1
    max_total_tokens: int = 1 << 30  # prompt + output never exceeds this (max_model_len)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_inflight_tokens: int = 0  # sampled by a step still evaluating (not in token_ids yet)
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    error: str | None = None
    forked: bool = False  # n > 1: its fork rows have been sampled
    seed: int = 0  # sampling seed (params.seed or one drawn by the engine)
    _token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts for the next step
    spec: SpecState = field(default_factory=SpecState)  # speculation counters

    def __post_init__(self) -> None:
        self.user_id = self.user_id or self.request_id
        self._token_ids = self.prompt_token_ids + self.output_token_ids

    def append_output_token(self, token_id: int) -> None:
        """Append one generated token (O(1); token_ids is never rebuilt)."""
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output ids, known on the host (the same list every call; do not mutate)."""
        if len(self._token_ids) != len(self.prompt_token_ids) + len(self.output_token_ids):
            self._token_ids = self.prompt_token_ids + self.output_token_ids  # appended directly
        return self._token_ids

    @property
    def num_tokens(self) -> int:
        """Known tokens plus in-flight ones: the length the next step extends."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, in-flight ones included (the sampler's step counter)."""
        return len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (the whole prompt at first, 1 when decoding);
        0 once the length cap is reached by count (the last token needs no KV)."""
        if self.num_tokens >= self.max_total_tokens:
            return 0
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
