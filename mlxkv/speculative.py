"""Speculative decoding policy (pure Python, no mx): the prompt-lookup drafter and draft sizing.

Before each step the engine asks `Speculator.propose` for drafts: every running request in
decode state that speculates gets up to k guessed continuation tokens in
`request.spec_token_ids`, from prompt lookup (`NgramIndex`) or from a draft model (a
`ModelDrafter`, mlxkv.draft_model: k batched greedy steps over every drafting request). The scheduler only counts them (1 + k query rows); verification
(mlxkv.spec_verify) accepts a prefix of them, and the engine trims the rejected ones from the
block table. Invariants:

  * drafts are never part of `token_ids` and are never committed to the prefix cache;
  * a draft never reaches past the request's token limit: accepting every draft and the
    bonus token yields at most the tokens `max_tokens` / `max_model_len` still allow;
  * requests whose sampling depends on earlier tokens of the same step (repetition,
    presence and frequency penalties) never speculate.

Draft sizing (expected tokens per second): a step of R query rows takes step(R), the
measured curve `SpeculativeConfig.step_cost` (relative to a one-row step). A decode row
yields one token; a draft at position j of a request whose drafts are accepted with
probability a (decayed estimate, prior 1/2) adds g = a^j expected tokens and one row.
Candidate drafts are ranked by g (those under MIN_GAIN dropped), and the step verifies the
best e of them for the e that maximises

    (decode rows + g_1 + ... + g_e) / step(decode rows + e)

(fewest rows on a tie), if that beats no drafts by MIN_SPEEDUP. The whole curve is searched, not only the next row's cost: on this
CPU a step costs little more per row up to the compiled linear's 24 rows and jumps past
them, so "fill up to 24 rows" can win where "add one more row" would not. High-acceptance
requests get depth, the others none; a batch whose rows already cost their compute does
not speculate. With prompt lookup a request that does not draft still scores the first
draft it would have had against the token that comes (`observe`): the lookup ran anyway,
and without it a request whose early drafts failed would never draft again, however
well the drafter later guesses.

A draft model is not free: drafting d deep runs d draft steps (one flat batch each, shared
by every drafting request), each costing draft_cost * step(decode rows). The rows are sized
as above, then every draft is capped at the depth d that maximises expected tokens over
step(rows) + draft_cost * step(decode rows) * d (prompt lookup, draft_cost 0, keeps every
row). So the target drafting for itself (draft_cost 1) never drafts, and a cheap draft
drafts deep only while it is accepted. The model drafter is sized before it runs (its
drafts always have the full length); its cache is rewound to the committed tokens after
each update (`rewind`) and freed with the request (`release`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mlxkv.config import SpeculativeConfig

MIN_GAIN = 0.1  # a draft position accepted with a lower probability is not worth its row
# Drafts must promise this much more tokens per time than none: the curve is a median of a
# noisy machine, and a drafting step adds host work (lookup, verification, trim) that
# cannot overlap the previous step's evaluation.
MIN_SPEEDUP = 1.1

if TYPE_CHECKING:
    from mlxkv.request import Request


@dataclass(slots=True)
class SpecState:
    """One request's speculation counters and acceptance estimate."""

    num_proposed: int = 0  # draft tokens verified so far
    num_accepted: int = 0  # of which accepted
    num_steps: int = 0  # verification steps
    index: NgramIndex | None = None  # the default drafter's n-gram index (built lazily)
    decayed_accepted: float = 0.0  # exponentially decayed per-token acceptance counts
    decayed_trials: float = 0.0
    guess: tuple[int, int] | None = None  # (position, token) prompt lookup proposed there

    @property
    def acceptance(self) -> float:
        """Estimated probability that the next draft token is accepted (prior 1/2)."""
        return (self.decayed_accepted + 1.0) / (self.decayed_trials + 2.0)

    def record(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        """Account one verification: num_accepted of num_drafts draft tokens accepted."""
        trials = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.decayed_accepted = decay * self.decayed_accepted + num_accepted
        self.decayed_trials = decay * self.decayed_trials + trials
        self.num_proposed += num_drafts
        self.num_accepted += num_accepted
        self.num_steps += 1

    def observe(self, hit: bool, decay: float) -> None:
        """Account one unverified guess (a first draft the request did not draft) against
        the token that came: the estimate only, not the counters of verified drafts."""
        self.decayed_accepted = decay * self.decayed_accepted + hit
        self.decayed_trials = decay * self.decayed_trials + 1


def step_time(curve: Sequence[tuple[int, float]], rows: float) -> float:
    """Interpolate a step-time curve (knots (rows, time), rows increasing): linear between
    knots, the first knot's time below it, the last segment's slope past the last knot
    (flat with a single knot)."""
    first_rows, first_time = curve[0]
    if rows <= first_rows or len(curve) == 1:
        return first_time
    for (ra, ta), (rb, tb) in zip(curve, curve[1:], strict=False):
        if rows <= rb:
            return ta + (tb - ta) * (rows - ra) / (rb - ra)
    (ra, ta), (rb, tb) = curve[-2], curve[-1]
    return tb + (tb - ta) * (rows - rb) / (rb - ra)


def best_num_drafts(gains: Sequence[float], num_rows: int,
                    step: Callable[[float], float], margin: float = MIN_SPEEDUP) -> int:
    """How many of `gains` (expected tokens per draft row, best first) a step of `num_rows`
    decode rows should verify: the e maximising (num_rows + sum(gains[:e])) / step(num_rows
    + e), the smallest such e on a tie; 0 unless that beats no drafts by the factor
    `margin`."""
    plain = num_rows / step(num_rows)
    best, best_rate, tokens = 0, plain, float(num_rows)
    for num, gain in enumerate(gains, 1):
        tokens += gain
        rate = tokens / step(num_rows + num)
        if rate > best_rate:
            best, best_rate = num, rate
    return best if best_rate >= margin * plain else 0


def ngram_propose(token_ids: Sequence[int], max_drafts: int, min_n: int = 1,
                  max_n: int = 4) -> list[int]:
    """Prompt lookup: continue the last n-gram the way its latest earlier occurrence did.

    Tries n = max_n down to min_n; for the first n whose last n tokens occur earlier in
    token_ids, returns up to max_drafts tokens that followed the latest such occurrence.

        token_ids  a b c d x y b c ?        last 2-gram "b c" occurred at 1..2
        drafts           d x y b c           (the tokens after it, at most max_drafts)

    Returns [] when nothing matches or max_drafts <= 0.
    """
    num_tokens = len(token_ids)
    if max_drafts <= 0:
        return []
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        suffix = list(token_ids[num_tokens - n :])
        first = suffix[0]
        # latest start i < num_tokens - n with token_ids[i:i+n] == suffix
        for i in range(num_tokens - n - 1, -1, -1):
            if token_ids[i] == first and list(token_ids[i : i + n]) == suffix:
                return list(token_ids[i + n : i + n + max_drafts])
    return []


class NgramIndex:
    """Incremental prompt lookup for one request: the same answer as `ngram_propose`, at a
    cost per call proportional to the tokens appended since the last call (not the context).

    For each n it maps every n-gram except the final one to the end of its latest
    occurrence, so the final n-gram (the suffix) looks up its latest earlier occurrence.
    Token lists only grow (drafts never enter them); a shorter list rebuilds the index.
    """

    __slots__ = ("min_n", "max_n", "ends", "indexed")

    def __init__(self, min_n: int = 1, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end of its latest occurrence
        self.indexed = 0  # n-grams ending at 1..indexed are in `ends`

    def propose(self, token_ids: Sequence[int], max_drafts: int) -> list[int]:
        num_tokens = len(token_ids)
        if max_drafts <= 0:
            return []
        if num_tokens - 1 < self.indexed:  # not the list it indexed: start again
            self.ends.clear()
            self.indexed = 0
        ends = self.ends
        for end in range(self.indexed + 1, num_tokens):  # all but the final n-grams
            for n in range(self.min_n, min(self.max_n, end) + 1):
                ends[tuple(token_ids[end - n : end])] = end
        self.indexed = max(self.indexed, num_tokens - 1)
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            end = ends.get(tuple(token_ids[num_tokens - n :]))
            if end is not None:
                return list(token_ids[end : end + max_drafts])
        return []


def max_drafts_allowed(request: Request, k_max: int) -> int:
    """Drafts the request may verify now: accepted drafts plus the bonus token must fit."""
    remaining = request.max_total_tokens - request.num_tokens
    if request.params.max_tokens is not None:
        remaining = min(remaining, request.params.max_tokens - len(request.output_token_ids))
    return max(0, min(k_max, remaining - 1))


def wants_speculation(request: Request, default_on: bool) -> bool:
    """Whether the request speculates when in decode state (opted in, no penalties, no
    JSON-schema mask: those sample one row at a time from the previous tokens)."""
    p = request.params
    wanted = default_on if p.speculative is None else p.speculative
    return bool(wanted and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and p.json_schema is None)


def can_speculate(request: Request, default_on: bool) -> bool:
    """Whether the request speculates this step (decode state and `wants_speculation`)."""
    return (wants_speculation(request, default_on) and request.num_pending_tokens == 1
            and request.num_computed_tokens > 0)


class ModelDrafter(Protocol):
    """A draft model keyed by request id (mlxkv.draft_model.DraftModel)."""

    relative_cost: float  # one draft step's time / one target step's

    def propose(self, seqs: Sequence[tuple[str, Sequence[int], int]]) -> list[list[int]]:
        """Per (request_id, known token_ids, k): up to k greedy drafts (fewer or none when
        its pool is short or its prompt is still being prefilled)."""

    def rewind(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Keep only the KV of drafts that token_ids confirms."""

    def free(self, request_id: str) -> None:
        """Release the request's blocks (idempotent)."""


class Speculator:
    """Proposes drafts for a batch and keeps the acceptance statistics."""

    def __init__(self, config: SpeculativeConfig,
                 drafter: Callable[[Sequence[int], int], list[int]] | None = None,
                 model: ModelDrafter | None = None):
        """`drafter(token_ids, max_drafts)` -> drafts; default: each request's NgramIndex
        (what `ngram_propose` with the config's n-gram sizes returns; tests pass oracle
        drafters). `model`: a draft model, which then drafts instead."""
        self.config = config
        self.default_on = config.method in ("ngram", "draft")
        self.drafter = drafter  # None: each request's incremental NgramIndex
        self.model = model
        # one draft step's time / one target step's (module docstring); prompt lookup: 0
        self.draft_step_cost = model.relative_cost if model else 0.0
        self.counters = {"spec_proposed_tokens": 0, "spec_accepted_tokens": 0,
                         "spec_steps": 0}

    def draft(self, request: Request) -> list[int]:
        """The request's candidate drafts for its next step, from the tokens known now."""
        max_drafts = max_drafts_allowed(request, self.config.num_speculative_tokens)
        if self.drafter is not None:
            return self.drafter(request.token_ids, max_drafts)
        spec = request.spec
        if spec.index is None:
            spec.index = NgramIndex(self.config.ngram_min, self.config.ngram_max)
        return spec.index.propose(request.token_ids, max_drafts)

    def _candidates(self, running: Sequence[Request]):
        """(acceptance, request, drafts) per request that may draft; a draft model's
        drafts are placeholders of the length it may draft (it runs once sized)."""
        k_max = self.config.num_speculative_tokens
        for req in running:
            req.spec.guess = None
            if can_speculate(req, self.default_on):
                if self.model is not None:
                    drafts = [0] * max_drafts_allowed(req, k_max)
                else:
                    drafts = self.draft(req)
                    if drafts:  # scored by `observe` unless verified (propose clears it)
                        req.spec.guess = (len(req.token_ids), drafts[0])
                if drafts:
                    yield req.spec.acceptance, req, drafts

    def propose(self, running: Sequence[Request]) -> None:
        """Set `spec_token_ids` of every running request (empty when it does not speculate)."""
        for req in running:
            req.spec_token_ids = []
        candidates = list(self._candidates(running))
        take = self._size_drafts(candidates, num_rows=len(running))
        chosen = [(req, drafts[:num]) for (_, req, drafts), num in
                  zip(candidates, take, strict=True) if num]
        if self.model is not None and chosen:
            drafts = self.model.propose([(req.request_id, req.token_ids, len(d))
                                         for req, d in chosen])
            chosen = [(req, d) for (req, _), d in zip(chosen, drafts, strict=True)]
        for req, drafts in chosen:
            req.spec_token_ids = drafts
            req.spec.guess = None  # verified instead

    def would_draft(self, running: Sequence[Request]) -> bool:
        """Whether `propose` would give any request a draft, judged from the tokens known
        now (while a step is in flight, its last token is not): the engine keeps the step
        pipelining when it would not, so speculation costs nothing where nothing matches."""
        candidates = list(self._candidates(running))
        return any(self._size_drafts(candidates, num_rows=len(running)))

    def step_time(self, rows: float) -> float:
        """A step's time for `rows` query rows, relative to a one-row step."""
        return step_time(self.config.step_cost, rows)

    def _size_drafts(self, candidates, num_rows: int) -> list[int]:
        """How many drafts of each candidate pay for their rows (module docstring), then,
        for a draft model, the depth that pays for its draft steps too."""
        gains = [(alpha**j, n, j) for n, (alpha, _, drafts) in enumerate(candidates)
                 for j in range(1, len(drafts) + 1) if alpha**j >= MIN_GAIN]
        gains.sort(key=lambda g: -g[0])  # stable: a request's positions stay in order
        num = best_num_drafts([g for g, _, _ in gains], num_rows, self.step_time)
        take = [0] * len(candidates)
        for _, n, j in gains[:num]:
            take[n] = max(take[n], j)
        return self._cap_depth(take, candidates, num_rows) if self.draft_step_cost else take

    def _cap_depth(self, take: list[int], candidates, num_rows: int) -> list[int]:
        """Cap every draft at the depth d that maximises expected tokens / cost, where
        cost = step(rows) + draft_cost * step(num_rows) * d (d draft steps, shared by every
        drafting request)."""
        alphas = [alpha for alpha, _, _ in candidates]
        draft_step = self.draft_step_cost * self.step_time(num_rows)

        def ratio(depth: int) -> float:
            capped = [min(t, depth) for t in take]
            tokens = num_rows + sum(a**j for a, t in zip(alphas, capped, strict=True)
                                    for j in range(1, t + 1))
            return tokens / (self.step_time(num_rows + sum(capped)) + draft_step * depth)

        best = max(range(max(take, default=0) + 1), key=lambda d: (ratio(d), -d))
        return [min(t, best) for t in take]

    def rewind(self, request: Request) -> None:
        """After an update: the draft model keeps only the KV its drafts earned."""
        if self.model is not None:
            self.model.rewind(request.request_id, request.token_ids)

    def observe(self, request: Request) -> None:
        """After an update: a request that had a prompt-lookup guess for a position it did
        not draft scores it against the token that came, so its estimate follows the text
        while it does not draft (the lookup ran anyway; a draft model's is not run)."""
        guess, spec = request.spec.guess, request.spec
        if guess is not None and guess[0] < len(request.token_ids):
            spec.guess = None
            spec.observe(request.token_ids[guess[0]] == guess[1], self.config.acceptance_decay)

    def release(self, request: Request) -> None:
        """The request finished or was preempted: free its draft-model blocks."""
        if self.model is not None:
            self.model.free(request.request_id)

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Account one verification of request's drafts."""
        request.spec.record(num_drafts, num_accepted, self.config.acceptance_decay)
        self.counters["spec_proposed_tokens"] += num_drafts
        self.counters["spec_accepted_tokens"] += num_accepted
        self.counters["spec_steps"] += 1
