"""LLM: the offline convenience API over LLMEngine (generate a batch, or stream one request)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

from mlxkv.config import EngineConfig, ModelConfig
from mlxkv.engine import LLMEngine
from mlxkv.outputs import RequestOutput
from mlxkv.sampling import SamplingParams


class LLM:
    """`LLM()` loads the embedded default model; `LLM("path-or-name")` or `LLM(EngineConfig)`."""

    def __init__(self, model: str | EngineConfig | None = None, *, loaded=None, draft=None,
                 **config_kw):
        """`loaded` / `draft`: a LoadedModel or (model, tokenizer) instead of loading the
        model / the draft model of `--speculative draft`."""
        if isinstance(model, EngineConfig):
            config = model
        else:
            config = EngineConfig(model=ModelConfig(model=model), **config_kw)
        self.engine = LLMEngine.from_config(config, loaded=loaded, draft=draft)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def generate(self, prompts: Sequence[str | Sequence[int]] | str,
                 params: SamplingParams | None = None) -> list[dict]:
        """Run every prompt to completion in one continuous batch.

        Returns:
            Per prompt, a dict with "text", "token_ids", "finish_reason" (n > 1: lists per fork
            under "choices").
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for rid, prompt in zip(ids, prompts, strict=True):
            self.engine.add_request(rid, self._prompt_ids(prompt), params)
        results = {rid: {} for rid in ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id not in results:
                    continue  # a request added to the engine directly
                choice = results[out.request_id].setdefault(
                    out.index, {"text": "", "token_ids": [], "finish_reason": None,
                                "num_cached_tokens": 0, "logprobs": []})
                choice["text"] += out.new_text
                choice["token_ids"] += out.new_token_ids
                choice["logprobs"] += out.logprobs or []
                choice["num_cached_tokens"] = out.num_cached_tokens
                if out.finished:
                    choice["finish_reason"] = out.finish_reason
                    choice["error"] = out.error
        final = []
        for rid in ids:
            choices = [results[rid][i] for i in sorted(results[rid])]
            final.append({**choices[0], "choices": choices})
        return final

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Deltas of one request as they are produced."""
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, self._prompt_ids(prompt), params or SamplingParams())
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
        finally:
            self.engine.abort(rid)

    def stream_text(self, prompt, params: SamplingParams | None = None):
        """Yield (text_delta, stats) pairs; the last stats hold prompt/decode throughput."""
        start = time.perf_counter()
        first = None
        num_prompt = num_gen = num_drafts = num_accepted = 0
        for out in self.stream(prompt, params):
            if first is None:
                first = time.perf_counter()
            num_prompt, num_gen = out.num_prompt_tokens, out.num_generated_tokens
            num_drafts, num_accepted = out.num_draft_tokens, out.num_accepted_tokens
            yield out.new_text, {}
        end = time.perf_counter()
        first = first or end
        yield "", {
            "num_prompt_tokens": num_prompt,
            "num_generated_tokens": num_gen,
            "prompt_tps": num_prompt / max(first - start, 1e-9),
            "decode_tps": max(num_gen - 1, 0) / max(end - first, 1e-9),
            "ttft_s": first - start,
            "num_draft_tokens": num_drafts,
            "num_accepted_tokens": num_accepted,
        }
