"""DraftModel: the draft model of `--speculative draft`, with its own paged KV pool.

A small engine of its own, keyed by the target's request ids: a KVStore and a
KVCacheManager (the target's store/cache-manager design; no prefix caching) under a
ModelRunner over the draft model. It sees request ids and token ids, never Requests:
mlxkv.speculative decides who drafts and how deep, the engine runs it on its thread.

One proposal of k drafts for a sequence of L known tokens, n of them cached here:

    draft step 1   [ token_ids[n:L] ]       positions n .. L-1   (catch-up)  -> d_1
    draft step j   [ d_{j-1} ]              position  L + j - 2              -> d_j
    each step is one flat batch over every drafting sequence; the inputs of step j are
    step j - 1's argmax on the device: one host sync after step k

    cache after proposing   | token_ids[:L] | d_1 .. d_{k-1} |       (d_k is never input)
    target accepts d_1..d_a, emits c:  token_ids grows to L + a + 1
    rewind (after update)   | token_ids[:L] | d_1 .. d_a |           positions < L + a

Invariants, per request id (asserted by the tests after every engine step):
  * outside `propose`..update, the cache holds the KV of a prefix of the request's known
    tokens, never its last one (the next input): num_tokens <= len(token_ids) - 1, which
    after an update is <= the target's num_computed_tokens;
  * `rewind` keeps exactly the drafts the tokens confirm (a draft whose slot the target
    rejected, or never verified, is trimmed), so the next proposal continues from the
    committed tokens; `free` releases every block (finish, abort, preemption).
A first proposal prefills the prompt lazily, in chunks of at most `max_chunk_tokens` per
proposal; a sequence still prefilling, or one its pool cannot hold, gets no drafts. A
draft step that raises costs that step's drafts (its sequences' draft KV is freed and
recomputed later), never a request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxkv.cache_manager import KVCacheManager
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Plan:
    """One sequence's share of a proposal."""

    request_id: str
    start: int  # position of the first catch-up token
    token_ids: list[int]  # catch-up tokens (step 1)
    num_drafts: int  # 0: a prefill chunk only


class DraftModel:
    """Greedy drafts for the target's speculating requests (module docstring)."""

    def __init__(self, runner: ModelRunner, cache: KVCacheManager, max_chunk_tokens: int,
                 relative_cost: float):
        """`runner`: the draft model over its own KVStore; `cache`: that store's tables;
        `relative_cost`: one draft step's time / one target step's (draft sizing)."""
        self.runner = runner
        self.cache = cache
        self.max_chunk_tokens = max_chunk_tokens
        self.relative_cost = relative_cost
        self._drafted: dict[str, tuple[int, list[int]]] = {}  # id -> (L, drafts with KV)

    @property
    def store(self):
        return self.runner.store

    def num_tokens(self, request_id: str) -> int:
        """Tokens whose KV the draft holds for request_id."""
        return self.cache.num_tokens(request_id)

    # -- propose -------------------------------------------------------------------------
    def propose(self, seqs: Sequence[tuple[str, Sequence[int], int]]) -> list[list[int]]:
        """Per (request_id, token_ids, k): k greedy drafts continuing token_ids (none while
        its prompt is prefilled past this proposal's chunk budget or its pool is short)."""
        plans, budget = [], self.max_chunk_tokens
        for rid, ids, k in seqs:
            self.rewind(rid, ids)  # drafts of an earlier proposal that were never verified
            plan = self._plan(rid, ids, k, budget)
            if plan is not None:
                plans.append(plan)
                budget -= len(plan.token_ids)
        drafting = [p for p in plans if p.num_drafts]
        try:
            drafts = self._run(plans, drafting) if plans else []
        except Exception as exc:  # noqa: BLE001  (a failed draft costs its drafts only)
            log.warning("draft model step failed, no drafts this step: %s: %s",
                        type(exc).__name__, exc)
            for p in plans:  # their slots were allocated but may not hold valid KV
                self.free(p.request_id)
            return [[] for _ in seqs]
        by_id = {p.request_id: d for p, d in zip(drafting, drafts, strict=True)}
        for p in drafting:  # d_1 .. d_{k-1} were inputs: their KV sits at L .. L + k - 2
            self._drafted[p.request_id] = (p.start + len(p.token_ids), by_id[p.request_id][:-1])
        return [by_id.get(rid, []) for rid, _, _ in seqs]

    def _plan(self, rid: str, ids: Sequence[int], k: int, budget: int) -> _Plan | None:
        start = self.cache.num_tokens(rid)
        num_new = len(ids) - start  # >= 1: the draft never holds the last known token
        if num_new > budget:
            num_new, k = budget, 0  # a prefill chunk now, drafts on a later proposal
        if num_new <= 0:
            return None
        alloc = self.cache.allocate_slots(rid, num_new + max(0, k - 1))
        if alloc is None:
            return None  # the draft pool is short: this sequence does not draft now
        self.runner.copy_blocks(alloc.cow_copies)  # none without prefix caching or forks
        return _Plan(rid, start, list(ids[start : start + num_new]), k)

    def _run(self, live: list[_Plan], drafting: list[_Plan]) -> list[list[int]]:
        """Draft step 1 over every plan, steps 2..k over the drafting ones; one sync."""
        cache = self.cache
        entries = [SeqEntry(p.token_ids, p.start, cache.slot_arrays(
            p.request_id, p.start, p.start + len(p.token_ids)),
            cache.block_table_arrays(p.request_id), sample=bool(p.num_drafts))
            for p in live]
        first = self.runner.forward(build_batch(entries))  # logits of the drafting rows
        if not drafting:  # prefill chunks only
            mx.eval(self.store.arrays())
            return []
        steps = [mx.argmax(first, axis=-1).astype(mx.int32)]
        rows = [list(range(len(drafting)))]  # step j's rows -> index into drafting
        for j in range(1, max((p.num_drafts for p in drafting), default=0)):
            nxt = [i for i in rows[-1] if drafting[i].num_drafts > j]
            prev_row = {i: r for r, i in enumerate(rows[-1])}
            batch = build_batch([self._decode_entry(drafting[i], j) for i in nxt])
            batch.input_ids = steps[-1][mx.array([prev_row[i] for i in nxt])]
            steps.append(self._argmax(batch))
            rows.append(nxt)
        mx.eval(*steps, *self.store.arrays())
        drafts: list[list[int]] = [[] for _ in drafting]
        for tokens, step_rows in zip(steps, rows, strict=True):
            for token, i in zip(tokens.tolist(), step_rows, strict=True):
                drafts[i].append(token)
        return drafts

    def _decode_entry(self, plan: _Plan, j: int) -> SeqEntry:
        """Draft step j + 1 of `plan`: input d_j (set on the device) at position L + j - 1."""
        pos = plan.start + len(plan.token_ids) + j - 1
        return SeqEntry([0], pos, self.cache.slot_arrays(plan.request_id, pos, pos + 1),
                        self.cache.block_table_arrays(plan.request_id))

    def _argmax(self, batch) -> mx.array:
        return mx.argmax(self.runner.forward(batch), axis=-1).astype(mx.int32)

    # -- rewind / free -------------------------------------------------------------------
    def rewind(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Trim the drafts of the last proposal that token_ids does not confirm (the first
        mismatch and after), and never keep the last known token. O(1) without one."""
        drafted = self._drafted.pop(request_id, None)
        if drafted is None:
            return
        start, written = drafted
        matched = 0
        while (matched < len(written) and start + matched < len(token_ids)
               and written[matched] == token_ids[start + matched]):
            matched += 1
        keep = min(start + matched, len(token_ids) - 1)
        if keep >= self.cache.num_tokens(request_id):
            return
        if self.cache.can_trim(request_id, keep):
            self.cache.trim(request_id, keep)
        else:  # a window dropped blocks it needs (not seen: a proposal's allocation drops
            self.cache.free(request_id)  # only blocks below its catch-up): recompute

    def free(self, request_id: str) -> None:
        """Release request_id's blocks (tail first). Idempotent."""
        self._drafted.pop(request_id, None)
        self.cache.free(request_id)

    def stats(self) -> dict:
        """The draft pool's block counts (KVCacheManager.stats)."""
        bpb = [self.store.bytes_per_block(g) for g in range(len(self.store.groups))]
        return self.cache.stats(bytes_per_block=bpb)
