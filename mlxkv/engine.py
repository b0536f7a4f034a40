"""LLMEngine: the synchronous core. add_request / abort / step() -> RequestOutput deltas.

A step is four stages, each with one owner (docs/architecture.md has the diagram):

    schedule  Scheduler.schedule()          decides by counts: who runs, how many tokens
    execute   LLMEngine._execute()          one batched COW copy, the flat batch, forward,
                                            n > 1 fork rows, sample; mx.async_eval
    update    OutputProcessor.update()      progress, commits, forks, tokens, stops,
                                            logprobs, detokenization, frees
    emit      the returned RequestOutputs

Pipelining: after launching step N, step() schedules and launches step N + 1 (its decode
inputs read step N's sampled ids on the device) before it waits for N's ids, so the host
work of N + 1 overlaps N's evaluation. A request that stops at N has a row in N + 1 that
is dropped. Rows whose sampling needs host-side token values (penalties, JSON-schema
masks, speculative drafts) turn the overlap off for that step; speculation does so only
while the drafter finds drafts in the known tokens, and a step that verifies drafts is
never overlapped (how many tokens it accepts is known only after it evaluates).

Speculative decoding (#18, docs/speculative.md): before an unpipelined schedule the
Speculator sets drafts (prompt lookup, or k batched greedy steps of a draft model with its
own pool, mlxkv.draft_model); a speculating sequence runs 1 + k query rows, verified
lazily in execute (mlxkv.spec_verify); the output processor accepts, trims and commits,
and rewinds the draft model's cache to the committed tokens. The engine is the only code
that joins requests to arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import mlx.core as mx

from mlxkv.cache_manager import KVCacheManager
from mlxkv.config import EngineConfig
from mlxkv.draft_model import DraftModel
from mlxkv.errors import InvalidRequestError
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kernels.selfcheck import make_kernel_guard
from mlxkv.kv_store import KVStore
from mlxkv.output_processor import OutputProcessor, StepResult
from mlxkv.outputs import RequestOutput
from mlxkv.request import Request, RequestStatus
from mlxkv.runner import ModelRunner
from mlxkv.samplers import SampleRow, sample
from mlxkv.sampling import SamplingParams
from mlxkv.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from mlxkv.spec_verify import DraftRows, split_and_verify
from mlxkv.speculative import Speculator, wants_speculation
from mlxkv.structured import StructuredOutputs


class LLMEngine:
    """Continuous-batching generation over the paged KV store."""

    def __init__(self, model, tokenizer, store: KVStore, cache: KVCacheManager,
                 config: EngineConfig, max_model_len: int):
        self.tokenizer = tokenizer
        self.store = store
        self.cache = cache
        self.config = config
        self.max_model_len = max_model_len
        # The kernels (Metal, CUDA, the CPU extension) behind the self-check and runtime guard.
        self.kernels, decode_op = make_kernel_guard(
            config.attention, config.kernel_verbose, store,
            getattr(getattr(model, "args", None), "num_attention_heads", None),
            selfcheck=config.kernel_selfcheck)
        self.runner = ModelRunner(model, store, decode_op, config.linear)
        self.scheduler = Scheduler(config.scheduler, cache)
        self.structured = StructuredOutputs(tokenizer)  # JSON-schema masks (json_schema rows)
        self.processor = OutputProcessor(self.scheduler, cache, tokenizer, self.structured,
                                         Speculator(config.speculative))
        self.processor.logits_sink = self._sink
        self.stats = self.processor.stats
        self.ttft = self.processor.ttft
        self.itl = self.processor.itl
        self.spec_acceptance = self.processor.spec_acceptance  # per finished request
        self.vocab_size = int(model.model.embed_tokens.weight.shape[0])
        self.pipeline = True  # overlap the next step's host work with this step's evaluation
        self._seeds = itertools.count(config.seed * 7919 + 1)
        self._inflight: StepResult | None = None
        # Called as sink(request_ids, logits [rows, vocab]) with the fp32 logits each step
        # samples from, row i belonging to request_ids[i] (forks included). For oracles and
        # debugging; None in serving.
        self.logits_sink: Callable[[list[str], mx.array], None] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, loaded=None,
                    draft=None) -> LLMEngine:
        """Load the model (unless `loaded` is given) and size the pool from the budget;
        `draft`: the draft model of `--speculative draft` (else loaded from the config)."""
        from mlxkv.engine_factory import build_engine

        return build_engine(cls, config or EngineConfig(), loaded, draft)

    def attach_draft(self, draft: DraftModel) -> None:
        """Speculate with a draft model (its own pool; mlxkv.draft_model) under the
        engine's SpeculativeConfig; its attention goes through this engine's kernels."""
        draft.runner.decode_op = self.kernels.install(draft.store)
        self.speculator = Speculator(self.config.speculative, model=draft)

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request that can never run (nothing allocated)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams", param="params")
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model and KV pool hold at "
                f"most {self.max_model_len} tokens per sequence, including at least one generated",
                param="messages",
            )
        self.structured.validate(params.json_schema)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams) -> None:
        """Queue a request (params.n > 1: forks are made after its prefill)."""
        prompt = [int(t) for t in prompt_token_ids]
        self.validate(prompt, params)
        if self.scheduler.get(request_id) is not None:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        limit = len(prompt) + (params.max_tokens or self.max_model_len)
        req = Request(request_id, prompt, params, max_total_tokens=min(limit, self.max_model_len))
        req.seed = params.seed if params.seed is not None else next(self._seeds)
        self.processor.add(req)

    def abort(self, request_id: str) -> bool:
        """Abort a request and its forks; frees their blocks. Returns whether any was live."""
        found = False
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            if req.user_id == request_id or req.request_id == request_id:
                self.processor.finish(req, RequestStatus.FINISHED_ABORTED)
                found = True
        return found

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or self.processor.has_pending()
                or self._inflight is not None)

    def num_unfinished(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    @property
    def eos_token_ids(self) -> set[int]:
        return self.processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:  # tests stop on a chosen token
        self.processor.eos_token_ids = ids

    @property
    def speculator(self) -> Speculator:
        """Drafts and acceptance statistics (#18, docs/speculative.md); the processor
        records acceptance into it (tests swap in one with an oracle drafter)."""
        return self.processor.speculator

    @speculator.setter
    def speculator(self, speculator: Speculator) -> None:
        self.processor.speculator = speculator

    @property
    def _detok(self):  # the per-request detokenizers (tests inject faults through it)
        return self.processor.detokenizers

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return every request's new delta (the step's own tokens).

        The next step may already be launched when this returns (see the module doc).
        """
        outputs = self.processor.take_pending()
        current, self._inflight = self._inflight, None
        if current is None:
            current = self._launch(None)
        if current is None:
            return outputs + self.processor.take_pending()
        if self.pipeline and not current.spec and not self._needs_host_values():
            self._inflight = self._launch(current)  # host work of N + 1 while N evaluates
        return outputs + self.processor.update(current)

    def _needs_host_values(self) -> bool:
        """Whether the next step needs token values still being sampled (so cannot overlap):
        penalties, a grammar whose mask needs the previous token, or drafts (looked up from
        the tokens; rejected ones are trimmed at update). Speculation stops the overlap only
        while the drafter finds a draft worth its rows in the tokens known now: free-form
        text with no n-gram match keeps pipelining. (A step that verifies drafts never
        overlaps the next: how many tokens it adds is known only at its update.)"""
        running = self.scheduler.running
        if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty
               or r.params.frequency_penalty or r.params.json_schema is not None
               for r in running):
            return True
        default_on = self.speculator.default_on
        return (any(wants_speculation(r, default_on) for r in running)
                and self.speculator.would_draft(running))

    def _launch(self, prev: StepResult | None) -> StepResult | None:
        """Schedule and execute one step (lazy: evaluation runs in the background). `prev`:
        the step still evaluating, whose sampled ids feed this step's decode rows."""
        if prev is None:  # token values are all known: drafts can be looked up
            self.speculator.propose(self.scheduler.running)
        else:  # pipelined: no running request speculates (see _needs_host_values)
            for req in self.scheduler.running:
                req.spec_token_ids = []
        out = self.scheduler.schedule()
        if not out.scheduled:
            self.processor.advance(out)
            return None
        self.stats["steps"] += 1
        try:
            step = self._execute(out, prev)
        except Exception as exc:  # a failure in the batch fails its requests, not the engine
            self.processor.advance(out)
            self._fail_batch(out, f"{type(exc).__name__}: {exc}")
            return None
        self.processor.advance(out, step.rows)
        return step

    def _fail_batch(self, out: SchedulerOutput, message: str) -> None:
        for s in out.scheduled:
            req = s.request
            self.processor.fail(req, message)
            if req.params.n > 1 and req.index == 0 and not req.forked:
                for i in range(1, req.params.n):  # its forks' streams end with it
                    self.processor.make_fork(req, i)

    def _execute(self, out: SchedulerOutput, prev: StepResult | None) -> StepResult:
        self._copy_blocks(out.scheduled)
        entries, deferred = self._entries(out.scheduled, prev)
        batch = build_batch(entries)
        if deferred:  # decode inputs still being sampled by the previous step
            flat, rows = zip(*deferred, strict=True)
            batch.input_ids[mx.array(flat)] = prev.token_ids[mx.array(rows)]
        logits = self.runner.forward(batch)
        step = StepResult(out.scheduled)
        step.rows = self._sample_rows(out.scheduled)
        logits, spec_arrays = self._verify(logits, out.scheduled, step)
        if not step.rows:  # prefill chunks that do not reach the end, or only speculating
            mx.async_eval(*spec_arrays, *self.store.arrays())
            return step
        logits = self._fork_logits(logits, step.rows)
        if self.logits_sink is not None:
            self.logits_sink([req.request_id if not i else f"{req.request_id}#{i}"
                              for req, i in step.rows], logits)
        requests = [req for req, _ in step.rows]  # a fork row masks as its parent (no tokens yet)
        tokens, logprobs = sample(logits, [self._sample_row(req, i) for req, i in step.rows],
                                  lambda x: self.structured.apply(x, requests))
        step.token_ids = tokens
        step.row_of = {req.request_id: row for row, (req, i) in enumerate(step.rows) if not i}
        arrays = [tokens]
        if logprobs is not None:
            step.logprobs = _logprob_summary(logprobs, tokens, step.rows)
            arrays += step.logprobs
        mx.async_eval(*arrays, *spec_arrays, *self.store.arrays())
        return step

    # -- speculative decoding (#18; drafts: mlxkv.speculative, verification: spec_verify) --
    def _verify(self, logits: mx.array, scheduled: list[ScheduledSeq], step: StepResult):
        """Split the logits into the plain sampled rows and the speculating sequences' rows;
        verify the drafts lazily into `step.spec`. Returns (plain logits, arrays to eval)."""
        if not any(s.num_draft_tokens for s in scheduled):
            return logits, []
        plain_rows, spec, num_logits = [], [], 0
        for s in scheduled:
            if not s.samples:
                continue
            req, k = s.request, s.num_draft_tokens
            if k:
                drafts = req.spec_token_ids[:k]
                spec.append((DraftRows(req.params, req.seed, req.num_output_tokens, drafts),
                             num_logits))
            else:
                plain_rows.append(num_logits)
            num_logits += 1 + k
        plain, spec_logits, verdicts = split_and_verify(logits, plain_rows, spec)
        arrays = [spec_logits, *verdicts]
        logprobs = None
        if any(row.params.logprobs is not None for row, _ in spec):
            lp = spec_logits - mx.logsumexp(spec_logits, axis=-1, keepdims=True)
            k = max(row.params.logprobs or 0 for row, _ in spec)
            top_ids = mx.argsort(-lp, axis=-1)[:, :k]
            logprobs = (lp, top_ids, mx.take_along_axis(lp, top_ids, axis=-1))
            arrays += logprobs
        step.spec = [(s.request, row.drafts) for s, (row, _) in
                     zip([s for s in scheduled if s.num_draft_tokens], spec, strict=True)]
        step.spec_logits, step.spec_verdicts, step.spec_logprobs = (spec_logits, verdicts,
                                                                    logprobs)
        return plain, arrays

    def _sink(self, request_ids: list[str], logits: mx.array) -> None:
        if self.logits_sink is not None:
            self.logits_sink(request_ids, logits)

    def _copy_blocks(self, scheduled: list[ScheduledSeq]) -> None:
        """One batched COW copy per layer group for the whole step, before its writes."""
        pairs: list[list[tuple[int, int]]] = [[] for _ in self.cache.groups]
        for s in scheduled:
            for group_pairs, copies in zip(pairs, s.allocation.cow_copies, strict=True):
                group_pairs.extend(copies)
        self.runner.copy_blocks(pairs)

    def _entries(self, scheduled: list[ScheduledSeq], prev: StepResult | None):
        entries, deferred, num_flat = [], [], 0
        for s in scheduled:
            req, end = s.request, s.start + s.num_new_tokens
            rid = req.request_id
            ids = req.token_ids[s.start : s.start + s.num_known_tokens]
            if len(ids) < s.num_known_tokens:  # the last input is in flight (prev's row)
                deferred.append((num_flat + len(ids), prev.row_of[rid]))
                ids.append(0)
            ids += req.spec_token_ids[: s.num_draft_tokens]  # verified as extra rows
            entries.append(SeqEntry(ids, s.start, self.cache.slot_arrays(rid, s.start, end),
                                    self.cache.block_table_arrays(rid), s.samples,
                                    1 + s.num_draft_tokens))
            num_flat += s.num_new_tokens
        return entries, deferred

    @staticmethod
    def _sample_rows(scheduled: list[ScheduledSeq]) -> list[tuple[Request, int]]:
        """Sampled rows: each sampling sequence, then the fork rows of fresh n > 1 prefills."""
        rows = [(s.request, 0) for s in scheduled if s.samples and not s.num_draft_tokens]
        forks = []
        for req, _ in rows:
            if req.params.n > 1 and not req.forked and req.index == 0:
                forks += [(req, i) for i in range(1, req.params.n)]
        return rows + forks

    @staticmethod
    def _fork_logits(logits: mx.array, rows: list[tuple[Request, int]]) -> mx.array:
        num_own = sum(1 for _, i in rows if not i)
        if num_own == len(rows):
            return logits
        row_of = {id(req): r for r, (req, i) in enumerate(rows) if not i}
        index = list(range(num_own)) + [row_of[id(req)] for req, i in rows[num_own:]]
        return logits[mx.array(index)]

    @staticmethod
    def _sample_row(req: Request, fork: int) -> SampleRow:
        return SampleRow(req.params, req.seed + fork, req.num_output_tokens,
                         req.token_ids if req.params.repetition_penalty != 1.0 else (),
                         req.output_token_ids)

    # -- introspection -------------------------------------------------------------------
    def cache_stats(self) -> dict:
        bpb = [self.store.bytes_per_block(g) for g in range(len(self.store.groups))]
        stats = self.cache.stats(bytes_per_block=bpb)
        stats["preemptions"] = self.scheduler.num_preemptions
        stats["attention"] = self.kernels.report()
        if self.speculator.model is not None:
            stats["draft"] = self.speculator.model.stats()
        stats["linear"] = self.runner.linear.report()
        return stats

    def metrics(self) -> dict:
        return {**self.stats, **self.speculator.counters,
                "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "ttft": list(self.ttft), "itl": list(self.itl),
                "spec_acceptance": list(self.spec_acceptance)}


def _logprob_summary(logprobs: mx.array, tokens: mx.array, rows) -> tuple:
    """(chosen [S], top ids [S, K], top values [S, K]) for K = the largest top-k asked."""
    k = max(req.params.logprobs or 0 for req, _ in rows)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_ids = mx.argsort(-logprobs, axis=-1)[:, :k]
    return chosen, top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1)
