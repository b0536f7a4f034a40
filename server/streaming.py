"""Turn an engine stream into SSE chunks (`data: ...`, usage chunk, `[DONE]`) or one response."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse

from mlxkv.errors import GenerationError
from mlxkv.outputs import RequestOutput
from server.responses import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    envelope,
    sse,
    usage,
)
from server.tool_calls import PlainText, finish_reason, fold

log = logging.getLogger("mlxkv.server")


def _finish(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "stop" if out.finish_reason in ("abort", None) else out.finish_reason


class _Usage:
    """Prompt tokens count once per prompt (forks share them), completions per choice."""

    def __init__(self, n: int):
        self.n = n
        self.prompts: dict[int, tuple[int, int]] = {}
        self.generated: dict[int, int] = {}
        self.drafted: dict[int, tuple[int, int]] = {}  # speculative (drafts, accepted)

    def add(self, out: RequestOutput) -> None:
        self.prompts[out.index // self.n] = (out.num_prompt_tokens, out.num_cached_tokens)
        self.generated[out.index] = out.num_generated_tokens
        self.drafted[out.index] = (out.num_draft_tokens, out.num_accepted_tokens)

    def body(self) -> dict:
        drafted = (sum(d for d, _ in self.drafted.values()),
                   sum(a for _, a in self.drafted.values()))
        return usage(sum(p for p, _ in self.prompts.values()), sum(self.generated.values()),
                     sum(c for _, c in self.prompts.values()), drafted)


def _chat_chunks(engine, request_id: str, out: RequestOutput, parser) -> list[dict]:
    deltas = parser.feed(out.new_text)
    finish = _finish(out)
    if out.finished:
        deltas += parser.close()
        finish = finish_reason(parser, finish)
    lp = chat_logprobs(engine.tokenizer, out.logprobs)
    if not deltas and (finish or lp):
        deltas = [{}]
    chunks = []
    for k, delta in enumerate(deltas):
        last = k == len(deltas) - 1
        choice = {"index": out.index, "delta": delta, "logprobs": lp if k == 0 else None,
                  "finish_reason": finish if last else None}
        chunks.append(envelope("chat.completion.chunk", request_id, engine.model_name, [choice]))
    return chunks


def _text_chunk(engine, request_id: str, out: RequestOutput, offsets: dict) -> dict:
    lp = completion_logprobs(engine.tokenizer, out.logprobs, offsets.get(out.index, 0))
    offsets[out.index] = offsets.get(out.index, 0) + len(out.new_text)
    choice = {"index": out.index, "text": out.new_text, "logprobs": lp,
              "finish_reason": _finish(out)}
    return envelope("text_completion", request_id, engine.model_name, [choice])


def _error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None,
                          "code": "generation_failed"}})


async def stream_chunks(engine, kind: str, request_id: str, first: RequestOutput,
                        stream: AsyncIterator[RequestOutput], n: int, include_usage: bool,
                        num_prompts: int = 1, make_parser=PlainText):
    """SSE body. Closing it (client gone) closes the engine stream, which aborts the request.

    `n` is forks per prompt; choice i of prompt p has index p * n + i. `make_parser` builds
    one chat parser per choice (content and tool calls).
    """
    offsets: dict[int, int] = {}
    parsers: dict[int, object] = {}
    counts = _Usage(n)
    try:
        if kind == "chat":
            role = [{"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None} for i in range(n * num_prompts)]
            yield sse(envelope("chat.completion.chunk", request_id, engine.model_name, role))
        out: RequestOutput | None = first
        while out is not None:
            counts.add(out)
            if out.error:
                yield _error_event(out.error)
            if kind == "chat":
                parser = parsers.setdefault(out.index, make_parser())
                for chunk in _chat_chunks(engine, request_id, out, parser):
                    yield sse(chunk)
            elif out.new_text or out.finished or out.logprobs:
                yield sse(_text_chunk(engine, request_id, out, offsets))
            out = await anext(stream, None)
        if include_usage:
            body = envelope("chat.completion.chunk" if kind == "chat" else "text_completion",
                            request_id, engine.model_name, [], counts.body())
            yield sse(body)
        yield sse("[DONE]")
    except Exception as exc:  # headers are sent: end the stream cleanly, never cut it
        log.error("%s: stream failed: %s: %s", request_id, type(exc).__name__, exc)
        yield _error_event(f"{type(exc).__name__}: {exc}")
        yield sse("[DONE]")
    finally:
        await stream.aclose()


async def collect(engine, kind: str, request_id: str, first: RequestOutput,
                  stream: AsyncIterator[RequestOutput], n: int, num_prompts: int = 1,
                  make_parser=PlainText) -> dict:
    """The non-streamed response: every choice (all prompts, all forks) to completion."""
    choices = {i: ChoiceState(i) for i in range(n * num_prompts)}
    counts = _Usage(n)
    out: RequestOutput | None = first
    try:
        while out is not None:
            choices[out.index].add(out)
            counts.add(out)
            out = await anext(stream, None)
    finally:
        await stream.aclose()
    failed = [c.error for c in choices.values() if c.finish_reason == "error"]
    if failed and len(failed) == len(choices):
        raise GenerationError(f"generation failed: {failed[0]}")
    body_choices = []
    for c in choices.values():
        if kind == "chat":
            parser = make_parser()
            message = fold(parser.feed(c.text) + parser.close())
            body_choices.append({
                "index": c.index, "message": message,
                "logprobs": chat_logprobs(engine.tokenizer, c.logprobs) if c.has_logprobs
                else None, "finish_reason": finish_reason(parser, c.finish_reason)})
        else:
            body_choices.append({
                "index": c.index, "text": c.text,
                "logprobs": completion_logprobs(engine.tokenizer, c.logprobs, 0)
                if c.has_logprobs else None, "finish_reason": c.finish_reason})
    return envelope("chat.completion" if kind == "chat" else "text_completion", request_id,
                    engine.model_name, body_choices, counts.body())


class SSEResponse(StreamingResponse):
    """An event stream that always closes its body and the engine stream when it ends.

    Starlette abandons the body iterator when the client disconnects (it is only finalised
    by garbage collection, or never if it had not started); closing both here aborts the
    request in the engine at once, whatever point the stream had reached.
    """

    def __init__(self, chunks, engine_stream):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._engine_stream = engine_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._engine_stream.aclose()
