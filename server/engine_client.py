"""The engine interface the server depends on; mlxkv.AsyncEngine and tests' FakeEngine implement it.

Threading: every method is called from the asyncio event loop thread. The engine owns all
mx arrays on its own thread; nothing here touches mlx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from mlxkv.outputs import RequestOutput
from mlxkv.sampling import SamplingParams


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine.

    Attributes:
        model_name: the served model id (what /v1/models lists and requests must name).
        tokenizer: an mlx-lm TokenizerWrapper / HF tokenizer: encode, decode, apply_chat_template,
            eos_token_id(s).
        max_model_len: the longest prompt + completion a request may have, in tokens.
    """

    model_name: str
    tokenizer: Any
    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas (all forks when params.n > 1, told apart by `index`).

        Raises (on first iteration): InvalidRequestError (never fits, bad params),
        EngineOverloadedError (queue full), EngineDeadError (engine thread gone).
        Closing the iterator early (client disconnect) aborts the request.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request if it is still running; frees its blocks. Idempotent."""
        ...

    def is_healthy(self) -> bool:
        """False once the engine thread has died."""
        ...

    def cache_stats(self) -> dict[str, Any]:
        """The block store's stats (blocks total/used/cached/free, bytes, hits, misses, evictions)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Counters and latency samples for /metrics (requests, tokens, ttft, itl, preemptions)."""
        ...
