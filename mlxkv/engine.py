"""LLMEngine: the synchronous core. add_request / abort / step() -> RequestOutput deltas.

One step: schedule (counts) -> COW copies -> build the flat batch -> forward over the
paged store -> n > 1 forks -> sample -> commit full computed blocks -> append tokens,
check stops, detokenise -> emit deltas (docs/architecture.md has the diagram). The engine
owns the scheduler, the cache manager, the runner and the tokenizer; it is the only code
that joins requests to arrays.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

import mlx.core as mx

from mlxkv.attention import default_decode_op
from mlxkv.cache_manager import KVCacheManager
from mlxkv.config import EngineConfig
from mlxkv.detokenizer import Detokenizer
from mlxkv.errors import InvalidRequestError
from mlxkv.inputs import SeqEntry, build_batch
from mlxkv.kv_store import KVStore
from mlxkv.outputs import RequestOutput, TokenLogprob
from mlxkv.request import Request, RequestStatus
from mlxkv.runner import ModelRunner
from mlxkv.samplers import SampleRow, sample
from mlxkv.sampling import SamplingParams
from mlxkv.scheduler import ScheduledSeq, Scheduler
from mlxkv.spec_verify import DraftRows, accepted_tokens, split_and_verify
from mlxkv.speculative import Speculator

_FINISH = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def _eos_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    ids = getattr(tokenizer, "eos_token_ids", None) or []
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(ids) | ({eos} if isinstance(eos, int) else set())


class LLMEngine:
    """Continuous-batching generation over the paged KV store."""

    def __init__(self, model, tokenizer, store: KVStore, cache: KVCacheManager,
                 config: EngineConfig, max_model_len: int):
        self.tokenizer = tokenizer
        self.store = store
        self.cache = cache
        self.config = config
        self.max_model_len = max_model_len
        self.runner = ModelRunner(
            model, store, default_decode_op(config.attention, config.kernel_verbose))
        self.scheduler = Scheduler(config.scheduler, cache)
        self.speculator = Speculator(config.speculative)
        self.eos_token_ids = _eos_ids(tokenizer)
        self._detok: dict[str, Detokenizer] = {}
        self._seeds = itertools.count(config.seed * 7919 + 1)
        self._pending: list[RequestOutput] = []
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0,
                      "cached_tokens": 0, "steps": 0, "errors": 0}
        self.ttft: deque[float] = deque(maxlen=4096)
        self.itl: deque[float] = deque(maxlen=4096)
        self.spec_acceptance: deque[float] = deque(maxlen=4096)  # per finished request
        # Called as sink(request_ids, logits [rows, vocab]) with the fp32 logits each step
        # samples from, row i belonging to request_ids[i] (forks included). For oracles and
        # debugging; None in serving.
        self.logits_sink: Callable[[list[str], mx.array], None] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, loaded=None) -> LLMEngine:
        """Load the model (unless `loaded` is given) and size the pool from the budget."""
        from mlxkv.engine_factory import build_engine

        return build_engine(cls, config or EngineConfig(), loaded)

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request that can never run (nothing allocated)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams", param="params")
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.runner.model.model.embed_tokens.weight.shape[0]
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model and KV pool hold at "
                f"most {self.max_model_len} tokens per sequence, including at least one generated",
                param="messages",
            )

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams) -> None:
        """Queue a request (params.n > 1: forks are made after its prefill)."""
        prompt = [int(t) for t in prompt_token_ids]
        self.validate(prompt, params)
        if self.scheduler.get(request_id) is not None:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        limit = len(prompt) + (params.max_tokens or self.max_model_len)
        req = Request(request_id, prompt, params, max_total_tokens=min(limit, self.max_model_len))
        self._detok[request_id] = Detokenizer(self.tokenizer, params.stop,
                                              params.include_stop_str_in_output,
                                              params.skip_special_tokens)
        req.seed = params.seed if params.seed is not None else next(self._seeds)
        self.scheduler.add(req)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt)

    def abort(self, request_id: str) -> bool:
        """Abort a request and its forks; frees their blocks. Returns whether any was live."""
        found = False
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            if req.user_id == request_id or req.request_id == request_id:
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                found = True
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def num_unfinished(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and return every request's new delta."""
        outputs, self._pending = self._pending, []
        self.speculator.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        if not out.scheduled:
            return outputs
        self.stats["steps"] += 1
        try:
            tokens, logprobs, rows, spec = self._forward(out.scheduled)
        except Exception as exc:  # a failure in the batch fails its requests, not the engine
            for s in out.scheduled:
                self._fail(s.request, f"{type(exc).__name__}: {exc}")
            return outputs + self._drain_pending()
        now = time.monotonic()
        for s in out.scheduled:  # drafts are not computed tokens until accepted
            s.request.num_computed_tokens += s.num_new_tokens - s.num_draft_tokens
            self.cache.commit(s.request.request_id, s.request.token_ids,
                              s.request.num_computed_tokens)
        for i, (req, _) in enumerate(rows):
            try:
                outputs.append(self._append(req, int(tokens[i]), logprobs, i, now))
            except Exception as exc:
                self._fail(req, f"{type(exc).__name__}: {exc}")
        if spec is not None:
            outputs += self._apply_spec(*spec, now)
        return outputs + self._drain_pending()

    def _forward(self, scheduled: list[ScheduledSeq]):
        entries, rows, plain_rows, spec_seqs, num_logits = [], [], [], [], 0
        for s in scheduled:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            drafts = req.spec_token_ids[: s.num_draft_tokens]
            self.runner.copy_blocks(s.allocation.cow_copies)
            entries.append(SeqEntry(req.token_ids[start:end] + drafts, start,
                                    self.cache.slot_mapping(req.request_id, start, end),
                                    self.cache.block_tables(req.request_id), s.samples,
                                    1 + len(drafts)))
            if drafts:
                spec_seqs.append((req, drafts, num_logits))
            elif s.samples:
                rows.append((req, len(entries) - 1))
                plain_rows.append(num_logits)
            num_logits += 1 + len(drafts) if s.samples else 0
        logits = self.runner.forward(build_batch(entries))
        logits, spec = self._verify(logits, plain_rows, spec_seqs)
        if not rows:  # prefill chunks that do not reach the end, or only speculating rows
            mx.eval(logits, self.store.arrays(), *(spec[2] if spec else ()))
            return [], None, [], spec
        sample_rows, logit_rows = [], []
        for row_idx, (req, _) in enumerate(list(rows)):
            for child in self._maybe_fork(req):
                rows.append((child, None))
                logit_rows.append(row_idx)
            sample_rows.append(self._sample_row(req))
        for child, _ in rows[len(sample_rows):]:
            sample_rows.append(self._sample_row(child))
        if logit_rows:
            index = mx.array(list(range(len(sample_rows) - len(logit_rows))) + logit_rows)
            logits = logits[index]
        if self.logits_sink is not None:
            self.logits_sink([req.request_id for req, _ in rows], logits)
        tokens, logprobs = sample(logits, sample_rows)
        mx.eval(tokens, self.store.arrays(), *([logprobs] if logprobs is not None else []),
                *(spec[2] if spec else ()))
        return tokens.tolist(), logprobs, rows, spec

    def _sample_row(self, req: Request) -> SampleRow:
        return SampleRow(req.params, req.seed, len(req.output_token_ids),
                         req.token_ids if req.params.repetition_penalty != 1.0 else (),
                         req.output_token_ids)

    def _maybe_fork(self, req: Request) -> list[Request]:
        """After the prefill of an n > 1 request, make its n - 1 forks (sharing all blocks)."""
        if req.params.n == 1 or req.forked or req.index != 0:
            return []
        req.forked = True
        children = []
        for i in range(1, req.params.n):
            child = Request(f"{req.request_id}#{i}", req.prompt_token_ids, req.params,
                            user_id=req.user_id, index=i, max_total_tokens=req.max_total_tokens)
            child.num_computed_tokens = req.num_tokens  # the prefill that samples covers all
            child.num_cached_tokens = req.num_cached_tokens
            child.seed = req.seed + i
            child.forked = True
            self.cache.fork(req.request_id, child.request_id)
            self._detok[child.request_id] = Detokenizer(
                self.tokenizer, req.params.stop, req.params.include_stop_str_in_output,
                req.params.skip_special_tokens)
            self.scheduler.admit_running(child)
            children.append(child)
        return children

    # -- speculative decoding (#18; drafts: mlxkv.speculative, verification: spec_verify) --
    def _verify(self, logits: mx.array, plain_rows: list[int], spec_seqs: list):
        """(the plain rows' logits, (spec_seqs, their logits, lazy verdicts) or None)."""
        if not spec_seqs:
            return logits, None
        plain, spec_logits, verdicts = split_and_verify(logits, plain_rows, [
            (DraftRows(req.params, req.seed, len(req.output_token_ids), drafts), first)
            for req, drafts, first in spec_seqs])
        return plain, (spec_seqs, spec_logits, verdicts)

    def _apply_spec(self, spec_seqs: list, logits: mx.array, verdicts: list,
                    now: float) -> list[RequestOutput]:
        """Commit each sequence's accepted tokens and trim its rejected drafts' slots."""
        logprobs = None
        if any(req.params.logprobs is not None for req, _, _ in spec_seqs):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        outputs, row = [], 0
        for n, (req, drafts, _) in enumerate(spec_seqs):
            accept, alt = verdicts[2 * n].tolist(), verdicts[2 * n + 1].tolist()
            token_ids = accepted_tokens(drafts, accept, alt)
            self.speculator.record(req, len(drafts), len(token_ids) - 1)
            if self.logits_sink is not None:
                self.logits_sink([req.request_id] * len(token_ids),
                                 logits[row : row + len(token_ids)])
            try:
                req.num_computed_tokens += len(token_ids) - 1
                self.cache.trim(req.request_id, req.num_computed_tokens)
                outputs.append(self._append_all(req, token_ids, logprobs, row, now))
            except Exception as exc:
                self._fail(req, f"{type(exc).__name__}: {exc}")
            row += len(drafts) + 1
        return outputs

    def _append_all(self, req: Request, token_ids: list[int], logprobs, row: int,
                    now: float) -> RequestOutput:
        """Append tokens in order until one finishes the request; one merged delta."""
        parts = []
        for i, token in enumerate(token_ids):
            parts.append(self._append(req, token, logprobs, row + i, now))
            if req.is_finished:
                break
        last = parts[-1]
        last.new_token_ids = [t for p in parts for t in p.new_token_ids]
        last.new_text = "".join(p.new_text for p in parts)
        if any(p.logprobs for p in parts):
            last.logprobs = [lp for p in parts for lp in p.logprobs or []]
        return last

    # -- results -------------------------------------------------------------------------
    def _append(self, req: Request, token: int, logprobs, row: int, now: float) -> RequestOutput:
        if req.is_finished:
            return self._output(req, [], "")
        if req.first_token_time is None:
            req.first_token_time = now
            self.ttft.append(now - req.arrival_time)
        elif req.last_token_time is not None:
            self.itl.append(now - req.last_token_time)
        req.last_token_time = now
        req.output_token_ids.append(token)
        self.stats["generation_tokens"] += 1
        lp = self._logprob(req, token, logprobs, row)
        status = self._check_stop(req, token)
        detok = self._detok[req.request_id]
        text = detok.update(self._visible_ids(req, status), final=status is not None)
        if detok.stopped_on is not None:
            req.stop_reason, status = detok.stopped_on, RequestStatus.FINISHED_STOPPED
        if status is not None:
            self._finish(req, status, emit=False)
        return self._output(req, [token], text, lp)

    def _visible_ids(self, req: Request, status) -> list[int]:
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
            req.num_tokens >= req.max_total_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _logprob(self, req: Request, token: int, logprobs, row: int):
        k = req.params.logprobs
        if k is None or logprobs is None:
            return None
        lp_row = logprobs[row]
        top = {}
        if k > 0:
            idx = mx.argsort(-lp_row)[:k]
            top = dict(zip(idx.tolist(), lp_row[idx].tolist(), strict=True))
        return [TokenLogprob(token, float(lp_row[token].item()), top)]

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

    def _finish(self, req: Request, status: RequestStatus, emit: bool = True) -> None:
        if req.is_finished:
            return
        self.scheduler.finish(req, status)
        self.stats["cached_tokens"] += max(0, req.num_cached_tokens)
        if req.spec.num_proposed:
            self.spec_acceptance.append(req.spec.num_accepted / req.spec.num_proposed)
        self._detok.pop(req.request_id, None)
        if emit:
            self._pending.append(self._output(req, [], ""))

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        self.stats["errors"] += 1
        self._finish(req, RequestStatus.FINISHED_ERROR)

    def _drain_pending(self) -> list[RequestOutput]:
        out, self._pending = self._pending, []
        return out

    # -- introspection -------------------------------------------------------------------
    def cache_stats(self) -> dict:
        bpb = [self.store.bytes_per_block(g) for g in range(len(self.store.groups))]
        stats = self.cache.stats(bytes_per_block=bpb)
        stats["preemptions"] = self.scheduler.num_preemptions
        return stats

    def metrics(self) -> dict:
        return {**self.stats, **self.speculator.counters,
                "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "ttft": list(self.ttft), "itl": list(self.itl),
                "spec_acceptance": list(self.spec_acceptance)}
