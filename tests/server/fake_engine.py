"""FakeEngine: a deterministic EngineClient for protocol tests (no model, no mlx).

Token i of a completion is `(sum(prompt) + 7 * i + index) % 50 + 100`; text is "t<id> ".
With `script` set, every choice generates those text pieces instead (then finishes "stop").
It tracks live requests so leak checks are real, and can be told to fail or overload.
"""

from __future__ import annotations

import asyncio

from mlxkv.errors import EngineOverloadedError, InvalidRequestError
from mlxkv.outputs import RequestOutput, TokenLogprob


class FakeTokenizer:
    eos_token_id = 2
    chat_template = "fake"

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 90) for c in text]

    def decode(self, ids, **kwargs) -> str:
        return "".join(f"t{i} " for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **kw):
        self.last_messages, self.last_tools = messages, tools
        ids = [1]
        for m in messages:
            ids += [4] + self.encode(m["role"] + ":" + (m.get("content") or ""))
        return ids + ([5] if add_generation_prompt else [])


class FakeEngine:
    model_name = "fake-model"
    max_model_len = 256

    def __init__(self, delay: float = 0.0, max_active: int = 1000):
        self.tokenizer = FakeTokenizer()
        self.delay = delay
        self.max_active = max_active
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.healthy = True
        self.fail_on: set[int] = set()  # step numbers at which a request errors
        self.num_requests = 0
        self.script: list[str] | None = None  # the text pieces every choice generates
        self.last_params = None

    def token(self, prompt, index: int, i: int) -> int:
        return (sum(prompt) + 7 * i + index) % 50 + 100

    async def generate(self, request_id, prompt_token_ids, params):
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(self.active) >= self.max_active:
            raise EngineOverloadedError("busy", retry_after_s=2)
        self.active.add(request_id)
        self.num_requests += 1
        self.last_params = params
        if self.script is not None:
            async for out in self._scripted(request_id, prompt_token_ids, params):
                yield out
            self.active.discard(request_id)
            return
        finished = 0
        try:
            steps = params.max_tokens or 8
            for i in range(steps):
                for index in range(params.n):
                    await asyncio.sleep(self.delay)
                    tok = self.token(prompt_token_ids, index, i)
                    last = i == steps - 1
                    err = i in self.fail_on
                    lp = None
                    if params.logprobs is not None:
                        lp = [TokenLogprob(tok, -0.5, {tok: -0.5, tok + 1: -1.5}
                                           if params.logprobs else {})]
                    yield RequestOutput(
                        request_id, index, [tok], f"t{tok} ", lp, finished=last or err,
                        finish_reason="error" if err else ("length" if last else None),
                        num_prompt_tokens=len(prompt_token_ids), num_cached_tokens=0,
                        num_generated_tokens=i + 1, error="injected failure" if err else None)
                    finished += last or err
                if i in self.fail_on:
                    return
        finally:
            self.active.discard(request_id)
            if finished < params.n:
                self.aborted.append(request_id)

    async def _scripted(self, request_id, prompt_token_ids, params):
        for i, piece in enumerate(self.script):
            for index in range(params.n):
                await asyncio.sleep(self.delay)
                last = i == len(self.script) - 1
                yield RequestOutput(request_id, index, [100 + i], piece, None, finished=last,
                                    finish_reason="stop" if last else None,
                                    num_prompt_tokens=len(prompt_token_ids),
                                    num_generated_tokens=i + 1)

    async def abort(self, request_id):
        self.active.discard(request_id)

    def is_healthy(self):
        return self.healthy

    def cache_stats(self):
        return {"blocks_total": 10, "blocks_used": len(self.active), "blocks_cached": 0,
                "blocks_free": 10 - len(self.active), "hit_rate": 0.0, "evictions": 0}

    def metrics(self):
        return {"requests": self.num_requests, "ttft": [0.01, 0.2], "itl": [0.01]}
