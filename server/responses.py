"""OpenAI response and SSE chunk bodies built from RequestOutput deltas (no I/O here)."""

from __future__ import annotations

import json
import time
from typing import Any

from mlxkv.outputs import RequestOutput, TokenLogprob


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id])
    except Exception:  # a tokenizer that cannot decode a lone id
        return ""


def chat_logprobs(tokenizer, items: list[TokenLogprob] | None) -> dict | None:
    if items is None:
        return None
    content = []
    for lp in items:
        text = _token_text(tokenizer, lp.token_id)
        top = [{"token": _token_text(tokenizer, t), "logprob": v,
                "bytes": list(_token_text(tokenizer, t).encode())} for t, v in lp.top.items()]
        content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                        "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, items: list[TokenLogprob] | None, offset: int) -> dict | None:
    if items is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in items:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t): v for t, v in lp.top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def usage(num_prompt: int, num_completion: int, num_cached: int,
          speculative: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """OpenAI usage; `speculative` (draft tokens verified, accepted), when any, adds the
    extension "speculative": {"draft_tokens", "accepted_tokens", "acceptance_rate"}."""
    body = {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": num_cached}}
    num_drafts, num_accepted = speculative
    if num_drafts:
        body["speculative"] = {"draft_tokens": num_drafts, "accepted_tokens": num_accepted,
                               "acceptance_rate": round(num_accepted / num_drafts, 4)}
    return body


class ChoiceState:
    """Accumulates one choice (fork) of a non-streamed response."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.has_logprobs = False
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        if out.logprobs is not None:
            self.has_logprobs = True
            self.logprobs += out.logprobs
        self.num_generated = out.num_generated_tokens
        if out.finished:
            self.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
            self.error = out.error


def envelope(kind: str, request_id: str, model: str, choices: list, usage_body=None) -> dict:
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return body
