"""Turn an engine stream into SSE chunks (`data: ...`, usage chunk, `[DONE]`) or one response."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse

from mlxkv.outputs import RequestOutput
from server.responses import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    envelope,
    sse,
    usage,
)


def _finish(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "stop" if out.finish_reason in ("abort", None) else out.finish_reason


def _chunk(engine, kind: str, request_id: str, out: RequestOutput, offsets: dict) -> dict:
    tok = engine.tokenizer
    if kind == "chat":
        delta = {"content": out.new_text} if out.new_text else {}
        choice = {"index": out.index, "delta": delta,
                  "logprobs": chat_logprobs(tok, out.logprobs), "finish_reason": _finish(out)}
        return envelope("chat.completion.chunk", request_id, engine.model_name, [choice])
    lp = completion_logprobs(tok, out.logprobs, offsets.get(out.index, 0))
    offsets[out.index] = offsets.get(out.index, 0) + len(out.new_text)
    choice = {"index": out.index, "text": out.new_text, "logprobs": lp,
              "finish_reason": _finish(out)}
    return envelope("text_completion", request_id, engine.model_name, [choice])


async def stream_chunks(engine, kind: str, request_id: str, first: RequestOutput,
                        stream: AsyncIterator[RequestOutput], n: int, include_usage: bool):
    """SSE body. Closing it (client gone) closes the engine stream, which aborts the request."""
    offsets: dict[int, int] = {}
    generated: dict[int, int] = {}
    drafted: dict[int, tuple[int, int]] = {}
    prompt = cached = 0
    try:
        if kind == "chat":
            role = [{"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None} for i in range(n)]
            yield sse(envelope("chat.completion.chunk", request_id, engine.model_name, role))
        out: RequestOutput | None = first
        while out is not None:
            prompt, cached = out.num_prompt_tokens, out.num_cached_tokens
            generated[out.index] = out.num_generated_tokens
            drafted[out.index] = (out.num_draft_tokens, out.num_accepted_tokens)
            if out.error:
                err = {"error": {"message": out.error, "type": "server_error", "param": None,
                                 "code": "generation_failed"}}
                yield sse(err)
            if out.new_text or out.finished or out.logprobs:
                yield sse(_chunk(engine, kind, request_id, out, offsets))
            out = await anext(stream, None)
        if include_usage:
            body = envelope("chat.completion.chunk" if kind == "chat" else "text_completion",
                            request_id, engine.model_name, [],
                            usage(prompt, sum(generated.values()), cached, _sum(drafted)))
            yield sse(body)
        yield sse("[DONE]")
    finally:
        await stream.aclose()


async def collect(engine, kind: str, request_id: str, first: RequestOutput,
                  stream: AsyncIterator[RequestOutput], n: int) -> dict:
    """The non-streamed response: every fork to completion."""
    choices = {i: ChoiceState(i) for i in range(n)}
    drafted: dict[int, tuple[int, int]] = {}
    out: RequestOutput | None = first
    prompt = cached = 0
    try:
        while out is not None:
            choices[out.index].add(out)
            drafted[out.index] = (out.num_draft_tokens, out.num_accepted_tokens)
            prompt, cached = out.num_prompt_tokens, out.num_cached_tokens
            out = await anext(stream, None)
    finally:
        await stream.aclose()
    failed = [c.error for c in choices.values() if c.finish_reason == "error"]
    if failed and len(failed) == n:
        from mlxkv.errors import GenerationError

        raise GenerationError(f"generation failed: {failed[0]}")
    body_choices = []
    for c in choices.values():
        if kind == "chat":
            body_choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(engine.tokenizer, c.logprobs) if c.has_logprobs
                else None, "finish_reason": c.finish_reason})
        else:
            body_choices.append({
                "index": c.index, "text": c.text,
                "logprobs": completion_logprobs(engine.tokenizer, c.logprobs, 0)
                if c.has_logprobs else None, "finish_reason": c.finish_reason})
    total = sum(c.num_generated for c in choices.values())
    return envelope("chat.completion" if kind == "chat" else "text_completion", request_id,
                    engine.model_name, body_choices, usage(prompt, total, cached, _sum(drafted)))


def _sum(drafted: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(draft tokens, accepted tokens) over the forks."""
    return sum(d for d, _ in drafted.values()), sum(a for _, a in drafted.values())


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
