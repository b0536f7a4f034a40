"""Scheduler alone, against a fake cache manager: exact queues, chunks, victims and calls.

No model and no arrays. `FakeCache` counts blocks the way KVCacheManager does (a table per
request, ceil(tokens / block_size) blocks, lookup attaches a preset hit) and logs every call,
so each test can assert the exact order in which the scheduler asks for and releases memory.
`step` plays the engine: it advances the scheduled chunks and appends one token per row
that samples.
"""

from __future__ import annotations

import pytest

from mlxkv.cache_manager import Allocation
from mlxkv.config import SchedulerConfig
from mlxkv.output_processor import advance_progress as advance
from mlxkv.request import Request, RequestStatus
from mlxkv.sampling import SamplingParams
from mlxkv.scheduler import Scheduler, SchedulerOutput

BLOCK_SIZE = 4


class FakeCache:
    """Just what Scheduler calls: has_request / lookup / allocate_slots / free."""

    def __init__(self, num_blocks: int, hits: dict[str, int] | None = None):
        self.num_free_blocks = num_blocks
        self.hits = dict(hits or {})  # request_id -> tokens the prefix cache would return
        self.tables: dict[str, list[int]] = {}  # request_id -> [num_tokens, num_blocks]
        self.calls: list[tuple] = []

    def has_request(self, request_id: str) -> bool:
        return request_id in self.tables

    def lookup(self, request_id: str, token_ids: list[int]) -> int:
        assert request_id not in self.tables, f"{request_id} looked up twice"
        max_hit = (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE  # the real cap
        num_cached = min(self.hits.get(request_id, 0), max_hit)
        self.num_free_blocks -= num_cached // BLOCK_SIZE  # a hit takes its blocks out of the LRU
        self.tables[request_id] = [num_cached, num_cached // BLOCK_SIZE]
        self.calls.append(("lookup", request_id, num_cached))
        return num_cached

    def allocate_slots(self, request_id: str, num_new_tokens: int) -> Allocation | None:
        num_tokens, num_blocks = self.tables.get(request_id, [0, 0])
        need = -(-(num_tokens + num_new_tokens) // BLOCK_SIZE) - num_blocks
        if need > self.num_free_blocks:
            self.calls.append(("allocate", request_id, num_new_tokens, None))
            return None
        self.num_free_blocks -= need
        self.tables[request_id] = [num_tokens + num_new_tokens, num_blocks + need]
        self.calls.append(("allocate", request_id, num_new_tokens, need))
        return Allocation(new_block_ids=[[-1] * need])

    def free(self, request_id: str) -> None:
        table = self.tables.pop(request_id, None)
        if table is not None:
            self.num_free_blocks += table[1]
        self.calls.append(("free", request_id))


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, list(range(num_prompt_tokens)), SamplingParams())


def make_scheduler(num_blocks=64, hits=None, **config) -> tuple[Scheduler, FakeCache]:
    cache = FakeCache(num_blocks, hits)
    return Scheduler(SchedulerConfig(**config), cache), cache  # type: ignore[arg-type]


def run(out: SchedulerOutput, token: int = 7) -> SchedulerOutput:
    """Do what the engine does with a schedule: record its progress (the output processor's
    `advance`), then land each sampled token."""
    advance(out)
    for s in out.scheduled:
        if s.samples:
            s.request.num_inflight_tokens -= 1
            s.request.append_output_token(token)
    return out


def step(sched: Scheduler) -> SchedulerOutput:
    return run(sched.schedule())


def rows(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# -- admission ---------------------------------------------------------------------------
def test_admission_is_fcfs_and_decodes_come_first():
    sched, cache = make_scheduler()
    for rid, n in [("a", 5), ("b", 3), ("c", 2)]:
        sched.add(make_request(rid, n))
    assert rows(step(sched)) == [("a", 5), ("b", 3), ("c", 2)]
    assert ids(sched.running) == ["a", "b", "c"] and not sched.waiting
    sched.add(make_request("d", 6))
    assert rows(step(sched)) == [("a", 1), ("b", 1), ("c", 1), ("d", 6)]
    assert [c[:2] for c in cache.calls[:6]] == [
        ("lookup", "a"), ("allocate", "a"), ("lookup", "b"), ("allocate", "b"),
        ("lookup", "c"), ("allocate", "c"),
    ]  # fmt: skip


def test_prefix_hit_schedules_only_uncached_tokens():
    sched, cache = make_scheduler(hits={"a": 8})
    a = make_request("a", 10)
    sched.add(a)
    out = step(sched)
    assert rows(out) == [("a", 2)]
    assert a.num_cached_tokens == 8 and a.num_computed_tokens == 10
    assert cache.calls == [("lookup", "a", 8), ("allocate", "a", 2, 1)]


def test_max_num_seqs_caps_the_running_set():
    sched, _ = make_scheduler(max_num_seqs=2)
    a, b, c = (make_request(rid, 3) for rid in "abc")
    for r in (a, b, c):
        sched.add(r)
    assert rows(step(sched)) == [("a", 3), ("b", 3)]
    assert ids(sched.waiting) == ["c"] and c.status is RequestStatus.WAITING
    assert rows(step(sched)) == [("a", 1), ("b", 1)]
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    assert rows(step(sched)) == [("b", 1), ("c", 3)]


def test_blocked_head_is_not_overtaken_and_its_lookup_is_undone():
    sched, cache = make_scheduler(num_blocks=3, hits={"a": 4})
    big, small = make_request("a", 16), make_request("b", 2)
    sched.add(big)
    sched.add(small)
    out = step(sched)
    assert out.scheduled == [] and ids(sched.waiting) == ["a", "b"]
    assert cache.calls == [("lookup", "a", 4), ("allocate", "a", 12, None), ("free", "a")]
    assert big.num_computed_tokens == 0 and not cache.has_request("a")
    assert cache.num_free_blocks == 3


def test_cached_tokens_are_recorded_at_admission_not_at_a_failed_attempt():
    sched, cache = make_scheduler(num_blocks=3, hits={"a": 4})
    a = make_request("a", 16)
    sched.add(a)
    step(sched)  # lookup hits 4 tokens, allocation fails, lookup undone
    assert a.num_cached_tokens == -1
    cache.hits["a"] = 0  # the cached block was evicted meanwhile
    cache.num_free_blocks = 4
    assert rows(step(sched)) == [("a", 16)]
    assert a.num_cached_tokens == 0


# -- token budget and chunked prefill ----------------------------------------------------
def test_budget_splits_between_decodes_and_prefill_chunks():
    sched, _ = make_scheduler(max_num_batched_tokens=10)
    a = make_request("a", 4)
    sched.add(a)
    step(sched)
    b, c = make_request("b", 6), make_request("c", 20)
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    assert rows(out) == [("a", 1), ("b", 6), ("c", 3)]
    assert [s.samples for s in out.scheduled] == [True, True, False]
    run(out)
    assert c.output_token_ids == [] and c.num_computed_tokens == 3
    out = step(sched)  # c is running now: it continues with what decodes leave
    assert rows(out) == [("a", 1), ("b", 1), ("c", 8)]
    assert rows(step(sched)) == [("a", 1), ("b", 1), ("c", 8)]
    out = sched.schedule()
    assert rows(out) == [("a", 1), ("b", 1), ("c", 1)] and out.scheduled[2].samples
    run(out)
    assert c.output_token_ids == [7]


def test_running_rows_past_the_budget_wait_for_the_next_step():
    sched, _ = make_scheduler(max_num_batched_tokens=2)
    for rid in "abc":
        sched.add(make_request(rid, 2))
    assert rows(step(sched)) == [("a", 2)]
    assert rows(step(sched)) == [("a", 1), ("b", 1)]
    assert rows(step(sched)) == [("a", 1), ("b", 1)]  # c waits: no budget left
    assert ids(sched.waiting) == ["c"]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched, cache = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add(make_request("a", 4))
    step(sched)
    sched.add(make_request("b", 8))
    out = step(sched)
    assert rows(out) == [("a", 1)] and ids(sched.waiting) == ["b"]
    assert cache.calls[-3:] == [("allocate", "a", 1, 1), ("lookup", "b", 0), ("free", "b")]
    sched.finish(sched.running[0], RequestStatus.FINISHED_STOPPED)
    assert rows(step(sched)) == [("b", 8)]


# -- preemption and resumption -----------------------------------------------------------
def two_decoding(num_blocks: int) -> tuple[Scheduler, FakeCache, Request, Request]:
    """a and b each hold two full blocks (8 prompt tokens) and one sampled token."""
    sched, cache = make_scheduler(num_blocks=num_blocks)
    a, b = make_request("a", 8), make_request("b", 8)
    sched.add(a)
    sched.add(b)
    assert rows(step(sched)) == [("a", 8), ("b", 8)]
    cache.calls.clear()
    return sched, cache, a, b


def test_preemption_takes_the_latest_admitted_and_resets_it_for_recompute():
    sched, cache, a, b = two_decoding(num_blocks=4)
    sched.add(make_request("c", 1))
    out = step(sched)
    assert rows(out) == [("a", 1)] and ids(out.preempted) == ["b"]
    assert cache.calls == [("allocate", "a", 1, None), ("free", "b"), ("allocate", "a", 1, 1)]
    assert ids(sched.running) == ["a"] and ids(sched.waiting) == ["b", "c"]  # b goes first
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [7] and b.num_pending_tokens == 9  # recompute prompt + output
    assert (b.num_preemptions, sched.num_preemptions) == (1, 1)
    assert not cache.has_request("b")  # c was not admitted in the preempting step


def test_preempted_request_resumes_first_with_its_output_recomputed():
    sched, cache, a, b = two_decoding(num_blocks=4)
    sched.add(make_request("c", 1))
    step(sched)  # b preempted; a's new block evicted b's tail, b's head is still cached
    cache.hits["b"] = 4
    cache.calls.clear()
    out = step(sched)  # b needs 2 blocks beyond its hit and 0 are free: nothing admitted
    assert rows(out) == [("a", 1)] and ids(sched.waiting) == ["b", "c"]
    assert cache.calls == [
        ("allocate", "a", 1, 0), ("lookup", "b", 4), ("allocate", "b", 5, None), ("free", "b"),
    ]  # fmt: skip
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    cache.calls.clear()
    out = step(sched)
    assert rows(out) == [("b", 5), ("c", 1)]
    assert cache.calls[:2] == [("lookup", "b", 4), ("allocate", "b", 5, 2)]
    assert b.num_cached_tokens == 0  # the hit at its first admission, not at resumption
    assert b.output_token_ids == [7, 7] and b.status is RequestStatus.RUNNING


def test_the_row_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    sched, cache, a, b = two_decoding(num_blocks=5)
    out = step(sched)  # a takes the last free block; b is then the only candidate
    assert rows(out) == [("a", 1)] and ids(out.preempted) == ["b"]
    assert cache.calls == [("allocate", "a", 1, 1), ("allocate", "b", 1, None), ("free", "b")]
    assert ids(sched.running) == ["a"] and ids(sched.waiting) == ["b"]


def test_a_lone_request_that_cannot_grow_preempts_itself():
    sched, cache = make_scheduler(num_blocks=2)
    a = make_request("a", 8)
    sched.add(a)
    step(sched)
    out = step(sched)
    assert out.scheduled == [] and ids(out.preempted) == ["a"]
    assert ids(sched.waiting) == ["a"] and cache.num_free_blocks == 2
    assert cache.calls[-2:] == [("allocate", "a", 1, None), ("free", "a")]


def test_scheduled_rows_are_never_victims():
    sched, cache = make_scheduler(num_blocks=3)
    for rid in "abc":
        sched.add(make_request(rid, 4))
    step(sched)  # each holds one full block; none free
    cache.calls.clear()
    out = step(sched)  # every row needs a second block
    assert rows(out) == [("a", 1)] and ids(out.preempted) == ["c", "b"]
    assert ids(sched.running) == ["a"]
    assert ids(sched.waiting) == ["b", "c"]  # the earlier admitted resumes first
    assert cache.calls == [
        ("allocate", "a", 1, None), ("free", "c"), ("allocate", "a", 1, 1),
        ("allocate", "b", 1, None), ("free", "b"),
    ]  # fmt: skip


# -- finish and abort --------------------------------------------------------------------
@pytest.mark.parametrize("where", ["running", "waiting"])
def test_finish_removes_the_request_and_frees_its_blocks(where):
    sched, cache = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 5), make_request("b", 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    target = a if where == "running" else b
    free_before = cache.num_free_blocks
    sched.finish(target, RequestStatus.FINISHED_ABORTED)
    assert target.status is RequestStatus.FINISHED_ABORTED and target.is_finished
    assert target not in sched.running and target not in sched.waiting
    assert sched.get(target.request_id) is None and cache.calls[-1] == ("free", target.request_id)
    assert cache.num_free_blocks == free_before + (2 if where == "running" else 0)
    other = b if where == "running" else a
    assert rows(step(sched)) == [(other.request_id, 5 if where == "running" else 1)]
    sched.finish(other, RequestStatus.FINISHED_STOPPED)
    assert not sched.has_unfinished() and cache.num_free_blocks == 64


def test_admit_running_adds_a_fork_behind_the_running_set():
    sched, cache = make_scheduler()
    sched.add(make_request("a", 4))
    step(sched)
    child = make_request("a#1", 4)
    child.num_computed_tokens = 4
    child.append_output_token(9)
    cache.tables["a#1"] = [4, 1]  # the fork shares a's table
    sched.admit_running(child)
    assert ids(sched.running) == ["a", "a#1"] and child.status is RequestStatus.RUNNING
    assert rows(step(sched)) == [("a", 1), ("a#1", 1)]
    assert sched.get("a#1") is child


# -- pipelining: tokens in flight ----------------------------------------------------------
def test_a_token_in_flight_is_scheduled_as_the_next_input():
    """Step N + 1 is scheduled before step N's token lands: the in-flight token counts."""
    sched, cache = make_scheduler()
    a = make_request("a", 5)
    sched.add(a)
    advance(sched.schedule())  # prefill launched, its token not on the host yet
    assert (a.num_computed_tokens, a.num_inflight_tokens, a.num_tokens) == (5, 1, 6)
    out = sched.schedule()
    assert rows(out) == [("a", 1)] and out.scheduled[0].start == 5 and out.scheduled[0].samples
    assert cache.calls[-1] == ("allocate", "a", 1, 0)


def test_a_request_at_its_length_cap_by_count_is_not_scheduled_again():
    sched, _ = make_scheduler()
    a = Request("a", list(range(5)), SamplingParams(max_tokens=1), max_total_tokens=6)
    sched.add(a)
    advance(sched.schedule())  # its only token is in flight
    assert a.num_pending_tokens == 0 and rows(sched.schedule()) == []
    assert sched.running == [a]  # the update finishes it when the token lands


def test_progress_is_written_by_advance_not_by_schedule():
    sched, _ = make_scheduler(hits={"a": 8})
    a = make_request("a", 10)
    sched.add(a)
    out = sched.schedule()
    assert (a.num_computed_tokens, a.num_cached_tokens) == (0, -1)  # decided, not recorded
    assert out.scheduled[0].start == 8 and out.scheduled[0].num_new_tokens == 2
    advance(out)
    assert (a.num_computed_tokens, a.num_cached_tokens, a.num_inflight_tokens) == (10, 8, 1)
