"""Scheduler: continuous batching by counts only (pure Python; no arrays, no block ids).

Each step: running requests first (decodes and unfinished prefill chunks, FCFS), then
waiting ones while the token budget, `max_num_seqs` and free blocks allow. A waiting
request is first matched against the prefix cache; only its uncached tokens are
scheduled, in chunks of at most the remaining budget. When a running request cannot get
blocks, the most recently admitted running request is preempted by recompute: its blocks
are released tail first and it goes back to the front of the queue. Decisions depend on
counts only, never on sampled token values (a token still being sampled counts as one),
so the next step can be scheduled while this one evaluates. Allocations are passed
through opaquely. The scheduler decides only: it moves requests between queues and sets
their status; request progress is written by the output processor from the
`SchedulerOutput` (mlxkv/output_processor.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mlxkv.cache_manager import Allocation, KVCacheManager
from mlxkv.config import SchedulerConfig
from mlxkv.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: tokens [start, start + num_new_tokens) get KV.

    `samples`: the chunk reaches the end of the sequence (in-flight tokens included), so
    its last row's logits are sampled. Fixed at scheduling time.
    """

    request: Request
    num_new_tokens: int
    allocation: Allocation
    start: int = -1  # tokens already computed (-1: the request's num_computed_tokens)
    num_draft_tokens: int = 0  # of num_new_tokens, speculative drafts (request.spec_token_ids)
    samples: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.request.num_computed_tokens
        end = self.start + self.num_new_tokens - self.num_draft_tokens
        self.samples = end == self.request.num_tokens

    @property
    def num_known_tokens(self) -> int:
        """The chunk's tokens that are not drafts (the ones computed for sure)."""
        return self.num_new_tokens - self.num_draft_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """FCFS continuous batching with chunked prefill and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, cache: KVCacheManager):
        self.config = config
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        return next((r for r in self.waiting if r.request_id == request_id), None)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from the queues and release its blocks (tail first)."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.request_id)

    def admit_running(self, request: Request) -> None:
        """Add an already-computed request (a fork) straight to the running set."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled_ids: set[str] = set()
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or budget <= 0:  # preempted just now
                continue
            num_new = min(req.num_pending_tokens + len(req.spec_token_ids), budget)
            if num_new <= 0:
                continue
            alloc = self.cache.allocate_slots(req.request_id, num_new)
            if alloc is None and num_new > req.num_pending_tokens:  # drop drafts, not others
                num_new = req.num_pending_tokens
                alloc = self.cache.allocate_slots(req.request_id, num_new)
            while alloc is None:
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim, out)
                if victim is req:
                    break
                alloc = self.cache.allocate_slots(req.request_id, num_new)
            if alloc is not None:
                num_drafts = max(0, num_new - req.num_pending_tokens)
                out.scheduled.append(ScheduledSeq(req, num_new, alloc, num_draft_tokens=num_drafts))
                scheduled_ids.add(req.request_id)
                budget -= num_new
        return budget

    def _pick_victim(self, scheduled_ids: set[str]) -> Request:
        for req in reversed(self.running):
            if req.request_id not in scheduled_ids:
                return req
        raise AssertionError("no preemptible request")  # the current one is never scheduled

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.cache.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.cache.has_request(req.request_id):
                start = self.cache.num_tokens(req.request_id)
            else:
                start = self.cache.lookup(req.request_id, req.token_ids)
            num_pending = req.num_tokens - start
            num_new = min(num_pending, budget)
            if num_new < num_pending and not self.config.enable_chunked_prefill:
                self.cache.free(req.request_id)  # undo the lookup
                break
            alloc = self.cache.allocate_slots(req.request_id, num_new)
            if alloc is None:
                self.cache.free(req.request_id)
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledSeq(req, num_new, alloc, start))
            budget -= num_new
