"""Long parity helpers: mlx-lm references with top logprobs and the per-step comparison
of the engine's logprobs against a reference (the codec round-trip cache is in oracles.py).

The main reference is mlx-lm's own `generate_step`, the loop under `generate` and
`stream_generate` (they stop at EOS, it does not, so lengths match `ignore_eos`). Per step
a Reference keeps the greedy token, its logprob and the top 16 logprobs: enough to check
the engine's top k (k <= 8) without holding whole vocabulary rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import generate_step
from oracles import greedy_cache_loop

from mlxkv.outputs import TokenLogprob
from mlxkv.sampling import SamplingParams


@dataclass(slots=True)
class Reference:
    """One greedy continuation: token ids, chosen-token logprobs and top logprobs per step."""

    token_ids: list[int]
    chosen: list[float]
    top: list[dict[int, float]]


def _record(ref: Reference, token: int, logprobs: mx.array, num_top: int) -> None:
    top_ids = mx.argpartition(-logprobs, num_top)[:num_top]
    ref.token_ids.append(token)
    ref.chosen.append(logprobs[token].item())
    ref.top.append(dict(zip(top_ids.tolist(), logprobs[top_ids].tolist(), strict=True)))


def mlx_lm_reference(model, prompt: Sequence[int], num_tokens: int,
                     num_top: int = 16) -> Reference:
    """Greedy `num_tokens` from mlx-lm's generate_step with its own KV cache."""
    ref = Reference([], [], [])
    for token, logprobs in generate_step(mx.array(list(prompt)), model, max_tokens=num_tokens):
        _record(ref, int(token), logprobs, num_top)
    return ref


def cache_loop_reference(model, prompt: Sequence[int], num_tokens: int, cache: list,
                         num_top: int = 16) -> Reference:
    """Greedy `num_tokens` from an mlx-lm cache loop: the whole prompt in one forward.

    Unlike generate_step (prompt[:-1], then the last token) this is the engine's order of
    work for a request running alone, which matters where fp32 rounding is amplified.
    """
    trace = greedy_cache_loop(model, prompt, num_tokens, cache)
    ref = Reference([], [], [])
    for token, row in zip(trace.token_ids, trace.logits, strict=True):
        logits = mx.array(row)
        _record(ref, token, logits - mx.logsumexp(logits), num_top)
    return ref


def greedy_params(num_tokens: int, num_top: int) -> SamplingParams:
    return SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True,
                          logprobs=num_top)


def logprob_diff(got: Sequence[TokenLogprob], ref: Reference, num_top: int) -> float:
    """Largest |engine - reference| over the chosen and top-k logprobs of every step.

    Token ids must already be equal. Each engine top-k token must be in the reference's
    top list, and the engine's k best values must match the reference's k best, so a
    token missing from either side shows up as a large difference.
    """
    assert len(got) == len(ref.token_ids)
    worst = 0.0
    for step, (lp, chosen, top) in enumerate(zip(got, ref.chosen, ref.top, strict=True)):
        assert lp.token_id == ref.token_ids[step]
        assert len(lp.top) == num_top, f"step {step}: {len(lp.top)} top logprobs"
        missing = set(lp.top) - set(top)
        assert not missing, f"step {step}: engine top-k {missing} not in mlx-lm's top"
        ref_best = sorted(top.values(), reverse=True)[:num_top]
        got_best = sorted(lp.top.values(), reverse=True)
        worst = max(worst, abs(lp.logprob - chosen),
                    *(abs(v - top[i]) for i, v in lp.top.items()),
                    *(abs(a - b) for a, b in zip(got_best, ref_best, strict=True)))
    return worst


def assert_matches(outs: Sequence[dict], refs: Sequence[Reference], num_top: int,
                   tol: float) -> float:
    """Every output's ids equal its reference's and logprobs within `tol`; the max diff."""
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        got = out["token_ids"]
        assert len(got) == len(ref.token_ids), (
            f"prompt {i}: {len(got)} tokens ({out['finish_reason']}: {out.get('error')})")
        diverged = [t for t, (a, b) in enumerate(zip(got, ref.token_ids, strict=True)) if a != b]
        assert not diverged, f"prompt {i}: ids differ from step {diverged[0]} on"
    worst = max(logprob_diff(o["logprobs"], r, num_top) for o, r in zip(outs, refs, strict=True))
    assert worst < tol, f"max logprob diff {worst:.3g} >= {tol:g}"
    return worst


def record_step_kinds(scheduler) -> list[tuple[int, int]]:
    """Wrap `scheduler.schedule` to log (num_decode_rows, num_prefill_chunks) per step."""
    kinds: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        num_prefill = sum(1 for s in out.scheduled
                          if s.request.num_computed_tokens < len(s.request.prompt_token_ids))
        kinds.append((len(out.scheduled) - num_prefill, num_prefill))
        return out

    scheduler.schedule = recording_schedule
    return kinds
