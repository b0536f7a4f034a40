"""OpenAI request models (pydantic). Unknown fields are accepted and ignored.

`to_sampling_params` turns a request into mlxkv SamplingParams, enforcing the server's
limits (ServerConfig) and raising InvalidRequestError naming the offending field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlxkv.config import ServerConfig
from mlxkv.errors import InvalidRequestError
from mlxkv.sampling import SamplingParams
from mlxkv.structured import check_json_schema


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def check_content(self, i: int) -> None:
        """Raise InvalidRequestError when a message that needs `content` has none.

        Only an assistant message carrying `tool_calls` may omit it (OpenAI's rule).
        """
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidRequestError(
                f"messages[{i}].content is required for a {self.role!r} message",
                f"messages.{i}.content")

    def text(self) -> str:
        """Content as plain text (text parts of a multi-part content are joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None
    response_format: dict[str, Any] | None = None
    speculative: bool | None = None  # extension: speculative decoding on/off (None: server)

    def _stop_list(self, limits: ServerConfig) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > limits.max_stop:
            raise InvalidRequestError(f"at most {limits.max_stop} stop sequences", "stop")
        if any(not s for s in stop):
            raise InvalidRequestError("stop sequences must be non-empty", "stop")
        return tuple(stop)

    def _common(self, limits: ServerConfig, max_tokens: int | None, logprobs: int | None,
                json_schema: str | None):
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be in [1, {limits.max_tokens_limit}]", "max_tokens")
        if not 1 <= self.n <= limits.max_n:
            raise InvalidRequestError(f"n must be in [1, {limits.max_n}]", "n")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed must be in [0, 2^63)", "seed")
        if json_schema is not None:
            check_json_schema(json_schema, "tool_choice" if getattr(
                self, "tool_choice", None) not in (None, "auto", "none") else "response_format")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=self._stop_list(limits),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            n=self.n,
            json_schema=json_schema,
            speculative=self.speculative,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def to_sampling_params(self, limits: ServerConfig,
                           json_schema: str | None = None) -> SamplingParams:
        """SamplingParams for this request; `json_schema` (text) constrains the output."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._common(limits, max_tokens, logprobs, json_schema)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def to_sampling_params(self, limits: ServerConfig,
                           json_schema: str | None = None) -> SamplingParams:
        """SamplingParams for this request; `json_schema` (text) constrains the output."""
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs must be in [0, 20]", "logprobs")
        return self._common(limits, self.max_tokens, self.logprobs, json_schema)
