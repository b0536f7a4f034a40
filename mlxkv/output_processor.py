"""OutputProcessor: the update half of a step, and the only writer of request progress.

    schedule (Scheduler) -> execute (LLMEngine) -> update + emit (here)

`advance` records what a launched step will compute (num_computed_tokens, one in-flight
token per sampled row, the prefix hit at first admission, the reset of a preempted
request) and commits the full blocks whose tokens are already known. `update` takes a finished step's sampled ids to the host and, per row: makes
the n > 1 forks (sharing the parent's blocks), appends the token, records logprobs, checks
stops (eos, stop ids, max_tokens, max_model_len, stop strings), detokenizes and frees
finished requests; full computed blocks are committed to the prefix index first. A
speculating sequence's verdicts are resolved here too: its accepted drafts and the
correction or bonus token are appended in order, the accepted drafts count as computed,
and the rejected drafts' slots are trimmed (in the draft model's pool too, when drafts
come from one: `Speculator.rewind` after every update, `release` when a request finishes
or is preempted). No other module writes these fields of a Request.

Update of step N may run after step N + 1 was launched (LLMEngine pipelines), so a
request finished here may still own a row of the step in flight: that row is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mlxkv.cache_manager import KVCacheManager
from mlxkv.detokenizer import Detokenizer
from mlxkv.outputs import RequestOutput, TokenLogprob
from mlxkv.request import Request, RequestStatus
from mlxkv.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from mlxkv.spec_verify import accepted_tokens
from mlxkv.speculative import Speculator
from mlxkv.structured import StructuredOutputs

_FINISH = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True)
class StepResult:
    """One launched step. Array fields are lazy until `update` reads them.

    rows[i] = (request, fork): row i of `token_ids` was sampled for `request` (fork 0) or
    for the fork-th n > 1 child of `request`, to be created at update time.
    """

    scheduled: list[ScheduledSeq]
    rows: list[tuple[Request, int]] = field(default_factory=list)
    token_ids: object = None  # mx.array [S] int32
    logprobs: tuple | None = None  # (chosen [S], top ids [S, K], top values [S, K]) arrays
    row_of: dict[str, int] = field(default_factory=dict)  # request_id -> its own row
    # Speculating sequences (not in `rows`): (request, drafts) with their verification
    # rows' logits, lazy verdicts [accept_0, alt_0, ...] (mlxkv.spec_verify) and logprobs
    # (full [R, V], top ids [R, K], top values [R, K]) or None.
    spec: list[tuple[Request, list[int]]] = field(default_factory=list)
    spec_logits: object = None
    spec_verdicts: list = field(default_factory=list)
    spec_logprobs: tuple | None = None


def advance_progress(out: SchedulerOutput) -> None:
    """Record the progress a launched schedule makes (before its values are known)."""
    for req in out.preempted:
        req.num_computed_tokens = 0  # recomputed from scratch when readmitted
    for s in out.scheduled:
        req = s.request
        if req.num_cached_tokens < 0:  # first admission (not a failed try, not a resume)
            req.num_cached_tokens = s.start
        req.num_computed_tokens = s.start + s.num_known_tokens  # drafts: once accepted
        if s.samples:
            req.num_inflight_tokens += 1


def eos_token_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    ids = getattr(tokenizer, "eos_token_ids", None) or []
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(ids) | ({eos} if isinstance(eos, int) else set())


class OutputProcessor:
    """Turns finished steps into request state and RequestOutput deltas."""

    def __init__(self, scheduler: Scheduler, cache: KVCacheManager, tokenizer,
                 structured: StructuredOutputs | None = None,
                 speculator: Speculator | None = None):
        self.scheduler = scheduler
        self.speculator = speculator  # acceptance statistics of speculating requests
        self.structured = structured  # grammar state of constrained requests (advanced here)
        self.cache = cache
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(tokenizer)
        self.detokenizers: dict[str, Detokenizer] = {}
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0,
                      "cached_tokens": 0, "steps": 0, "errors": 0}
        self.ttft: deque[float] = deque(maxlen=4096)
        self.itl: deque[float] = deque(maxlen=4096)
        self.spec_acceptance: deque[float] = deque(maxlen=4096)  # per finished request
        # sink(request_ids, logits) for the verification rows whose tokens are emitted
        self.logits_sink: Callable[[list[str], object], None] | None = None
        self._pending: list[RequestOutput] = []

    def add(self, req: Request) -> None:
        """Track a new request (its detokenizer) and hand it to the scheduler."""
        self.detokenizers[req.request_id] = self._detokenizer(req)
        self.scheduler.add(req)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += req.num_prompt_tokens

    def _detokenizer(self, req: Request) -> Detokenizer:
        p = req.params
        return Detokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output,
                           p.skip_special_tokens)

    def advance(self, out: SchedulerOutput, rows: list[tuple[Request, int]] = ()) -> None:
        """A schedule was launched (with sampled `rows`, see StepResult): record its progress,
        mark parents whose fork rows were sampled, and commit the full blocks whose tokens
        are known (before the next allocation can drop them out of a window)."""
        advance_progress(out)
        if self.speculator is not None:
            for req in out.preempted:  # recomputed from scratch: so is its draft KV
                self.speculator.release(req)
        for req, fork in rows:
            req.forked = req.forked or fork > 0
        for s in out.scheduled:
            self._commit(s)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def take_pending(self) -> list[RequestOutput]:
        """Deltas produced outside a step's update (aborts, failures), oldest first."""
        out, self._pending = self._pending, []
        return out

    # -- update --------------------------------------------------------------------------
    def update(self, step: StepResult) -> list[RequestOutput]:
        """Apply a step's sampled ids (waits for the step) and return the new deltas."""
        token_ids, logprobs = self._fetch(step)
        for s in step.scheduled:
            self._commit(s)
        now = time.monotonic()
        outputs = []
        for i, (req, fork) in enumerate(step.rows):
            if fork:
                req = self.make_fork(req, fork)
            else:
                req.num_inflight_tokens -= 1
            if req.is_finished:
                continue  # stopped or aborted while this row was in flight
            try:
                lp = [v[i] for v in logprobs] if logprobs else None
                outputs.append(self._append(req, token_ids[i], lp, now))
            except Exception as exc:
                self.fail(req, f"{type(exc).__name__}: {exc}")
        if step.spec:
            outputs += self._update_spec(step, now)
        if self.speculator is not None:  # a draft model keeps the KV of accepted drafts
            for req in self.scheduler.running:  # (also of drafts the step never verified);
                self.speculator.rewind(req)  # prompt lookup scores the guesses it did not
                self.speculator.observe(req)  # draft
        return outputs + self.take_pending()

    def _update_spec(self, step: StepResult, now: float) -> list[RequestOutput]:
        """Speculating sequences: emit the accepted drafts and the correction or bonus
        token, count the accepted drafts as computed, trim the rejected drafts' slots."""
        verdicts = [v.tolist() for v in step.spec_verdicts]
        lps = step.spec_logprobs
        outputs, row = [], 0
        for n, (req, drafts) in enumerate(step.spec):
            first, row = row, row + len(drafts) + 1
            req.num_inflight_tokens -= 1
            if req.is_finished:
                continue  # aborted while the step was in flight
            token_ids = accepted_tokens(drafts, verdicts[2 * n], verdicts[2 * n + 1])
            if self.speculator is not None:
                self.speculator.record(req, len(drafts), len(token_ids) - 1)
            if self.logits_sink is not None:
                self.logits_sink([req.request_id] * len(token_ids),
                                 step.spec_logits[first : first + len(token_ids)])
            try:
                req.num_computed_tokens += len(token_ids) - 1
                self.cache.trim(req.request_id, req.num_computed_tokens)
                self.cache.commit(req.request_id, req.token_ids + token_ids[:-1],
                                  req.num_computed_tokens)
                outputs.append(self._append_all(req, token_ids, lps, first, now))
            except Exception as exc:
                self.fail(req, f"{type(exc).__name__}: {exc}")
        return outputs

    def _append_all(self, req: Request, token_ids: list[int], lps, first: int,
                    now: float) -> RequestOutput:
        """Append tokens in order until one finishes the request; one merged delta."""
        parts = []
        for i, token in enumerate(token_ids):
            lp = None
            if lps is not None and req.params.logprobs is not None:
                full, top_ids, top_values = lps
                r = first + i
                lp = (full[r, token].item(), top_ids[r].tolist(), top_values[r].tolist())
            parts.append(self._append(req, token, lp, now))
            if req.is_finished:
                break
        last = parts[-1]
        last.new_token_ids = [t for p in parts for t in p.new_token_ids]
        last.new_text = "".join(p.new_text for p in parts)
        if any(p.logprobs for p in parts):
            last.logprobs = [lp for p in parts for lp in p.logprobs or []]
        return last

    def _fetch(self, step: StepResult) -> tuple[list[int], list | None]:
        """The step's sampled ids (and logprob summaries) on the host: waits for the step."""
        token_ids = step.token_ids.tolist() if step.token_ids is not None else []
        return token_ids, [a.tolist() for a in step.logprobs] if step.logprobs else None

    def _commit(self, s: ScheduledSeq) -> None:
        req = s.request
        if req.status is RequestStatus.RUNNING and self.cache.has_request(req.request_id):
            self.cache.commit(req.request_id, req.token_ids, s.start + s.num_known_tokens)

    def make_fork(self, parent: Request, i: int) -> Request:
        """Child i of an n > 1 request, sharing every block of the parent's prompt (a child
        of a finished parent ends the same way at once)."""
        child = Request(f"{parent.request_id}#{i}", parent.prompt_token_ids, parent.params,
                        user_id=parent.user_id, index=i,
                        max_total_tokens=parent.max_total_tokens)
        child.num_cached_tokens = parent.num_cached_tokens
        child.seed = parent.seed + i
        child.forked = True
        if parent.is_finished:  # the child's stream still needs its final delta
            child.status, child.error = parent.status, parent.error
            self._pending.append(self._output(child, [], ""))
            return child
        self.detokenizers[child.request_id] = self._detokenizer(child)
        if self.cache.has_request(parent.request_id):
            self.cache.fork(parent.request_id, child.request_id)
            if self.cache.num_tokens(child.request_id) > child.num_prompt_tokens:
                self.cache.trim(child.request_id, child.num_prompt_tokens)  # parent's next slot
            child.num_computed_tokens = child.num_prompt_tokens
            self.scheduler.admit_running(child)
        else:  # the parent was preempted meanwhile: the child recomputes its prompt
            self.scheduler.add(child)
        return child

    def _append(self, req: Request, token: int, lp, now: float) -> RequestOutput:
        if req.first_token_time is None:
            req.first_token_time = now
            self.ttft.append(now - req.arrival_time)
        elif req.last_token_time is not None:
            self.itl.append(now - req.last_token_time)
        req.last_token_time = now
        req.append_output_token(token)
        if self.structured is not None:
            self.structured.advance(req, token)
        self.stats["generation_tokens"] += 1
        logprobs = self._logprob(req, token, lp)
        status = self._check_stop(req, token)
        detok = self.detokenizers[req.request_id]
        text = detok.update(self._visible_ids(req, status), final=status is not None)
        if detok.stopped_on is not None:
            req.stop_reason, status = detok.stopped_on, RequestStatus.FINISHED_STOPPED
        if status is not None:
            self.finish(req, status, emit=False)
        return self._output(req, [token], text, logprobs)

    @staticmethod
    def _visible_ids(req: Request, status) -> list[int]:
        ids = req.output_token_ids
        if status is RequestStatus.FINISHED_STOPPED and req.stop_reason == ids[-1]:
            return ids[:-1]
        return ids

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if (p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens) or (
            len(req.token_ids) >= req.max_total_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _logprob(req: Request, token: int, lp) -> list[TokenLogprob] | None:
        k = req.params.logprobs
        if k is None or lp is None:
            return None
        chosen, top_ids, top_values = lp
        top = dict(zip(top_ids[:k], top_values[:k], strict=True)) if k > 0 else {}
        return [TokenLogprob(token, float(chosen), top)]

    # -- finishing -----------------------------------------------------------------------
    def _output(self, req: Request, new_ids, text, logprobs=None) -> RequestOutput:
        return RequestOutput(
            request_id=req.user_id, index=req.index, new_token_ids=list(new_ids),
            new_text=text, logprobs=logprobs, finished=req.is_finished,
            finish_reason=_FINISH.get(req.status), stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(0, req.num_cached_tokens),
            num_generated_tokens=len(req.output_token_ids), error=req.error,
            num_draft_tokens=req.spec.num_proposed, num_accepted_tokens=req.spec.num_accepted,
        )

    def finish(self, req: Request, status: RequestStatus, emit: bool = True) -> None:
        """End a request (idempotent): free its blocks tail first; queue its final delta."""
        if req.is_finished:
            return
        self.scheduler.finish(req, status)
        self.stats["cached_tokens"] += max(0, req.num_cached_tokens)
        if req.spec.num_proposed:
            self.spec_acceptance.append(req.spec.num_accepted / req.spec.num_proposed)
        self.detokenizers.pop(req.request_id, None)
        if self.structured is not None:
            self.structured.release(req.request_id)
        if self.speculator is not None:
            self.speculator.release(req)
        if emit:
            self._pending.append(self._output(req, [], ""))

    def fail(self, req: Request, message: str) -> None:
        req.error = message
        self.stats["errors"] += 1
        self.finish(req, RequestStatus.FINISHED_ERROR)
