"""Turn a chat choice's generated text into OpenAI message deltas: content and `tool_calls`.

One parser per choice is fed the text as it is detokenised (`feed`) and told when the choice
ends (`close`); both return delta dicts in OpenAI's streamed form. A non-streamed answer
feeds the whole text and folds the deltas (`fold`), so both paths share one parser.

- PlainText: every piece is content.
- TaggedToolCalls: the model family's own markers and parser (mlx-lm's tool_parsers, picked
  from the tokenizer the way mlx_lm.server picks them); text between the markers becomes
  tool calls, the rest content.
- ForcedFunction / ForcedRequired: `tool_choice` named or "required". The output was
  constrained to JSON (the function's arguments, or a list of {name, parameters}), so the
  JSON itself is the call.

Each call is streamed as a header delta (index, id, type, name, empty arguments) followed by
argument deltas; `finish_reason` becomes "tool_calls" when a call was made.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mlxkv.server")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class PlainText:
    made_calls = False

    def feed(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def close(self) -> list[dict]:
        return []


class _CallEmitter:
    """Numbers calls and renders the header + arguments deltas of each."""

    def __init__(self):
        self.num_calls = 0

    @property
    def made_calls(self) -> bool:
        return self.num_calls > 0

    def header(self, name: str) -> dict:
        call = {"index": self.num_calls, "id": _call_id(), "type": "function",
                "function": {"name": name, "arguments": ""}}
        self.num_calls += 1
        return {"tool_calls": [call]}

    def arguments(self, text: str) -> dict:
        return {"tool_calls": [{"index": self.num_calls - 1, "function": {"arguments": text}}]}

    def call(self, name: str, arguments: Any) -> list[dict]:
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        return [self.header(name), self.arguments(arguments)]


class TaggedToolCalls(_CallEmitter):
    """Calls between the family's start/end markers, parsed by its mlx-lm parser."""

    def __init__(self, start: str, end: str, parse: Callable, tools: list | None):
        super().__init__()
        self.start, self.end, self.parse, self.tools = start, end, parse, tools
        self.buffer = ""
        self.pending_space = ""  # trailing whitespace of the content so far, not yet sent
        self.tool_text: str | None = None  # inside a call: its text so far

    def _content(self, text: str) -> list[dict]:
        # Trailing whitespace waits for what follows: dropped before a call or at the end
        # after calls, so chunking never changes the content.
        text = self.pending_space + text
        body = text.rstrip()
        self.pending_space = text[len(body):]
        return [{"content": body}] if body else []

    def _calls(self, text: str) -> list[dict]:
        try:
            parsed = self.parse(text, self.tools)
            calls = [(c["name"], c.get("arguments", {}))
                     for c in (parsed if isinstance(parsed, list) else [parsed])]
        except Exception as exc:  # a truncated or malformed call stays visible as text
            log.warning("tool call not parsed (%s: %s)", type(exc).__name__, exc)
            return self._content(self.start + text + self.end)
        return [d for name, arguments in calls for d in self.call(name, arguments)]

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        out: list[dict] = []
        while self.buffer:
            if self.tool_text is None:
                at = self.buffer.find(self.start)
                if at < 0:
                    keep = _held_back(self.buffer, self.start)
                    cut = len(self.buffer) - keep
                    out += self._content(self.buffer[:cut])
                    self.buffer = self.buffer[cut:]
                    break
                out += self._content(self.buffer[:at])
                self.buffer, self.tool_text = self.buffer[at + len(self.start):], ""
                continue
            at = self.buffer.find(self.end) if self.end else -1
            if at < 0:
                keep = _held_back(self.buffer, self.end) if self.end else 0
                cut = len(self.buffer) - keep
                self.tool_text += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                break
            out += self._calls(self.tool_text + self.buffer[:at])
            self.buffer, self.tool_text = self.buffer[at + len(self.end):], None
        return out

    def close(self) -> list[dict]:
        if self.tool_text is not None:
            text, self.tool_text, self.buffer = self.tool_text + self.buffer, None, ""
            return self._calls(text) if text.strip() else []
        text, self.buffer, self.pending_space = self.pending_space + self.buffer, "", ""
        if not text or (self.made_calls and not text.strip()):
            return []
        return [{"content": text}]


class ForcedFunction(_CallEmitter):
    """tool_choice names a function: the constrained output is its arguments' JSON."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[dict]:
        out = [] if self.made_calls else [self.header(self.name)]
        return out + ([self.arguments(text)] if text else [])

    def close(self) -> list[dict]:
        return [] if self.made_calls else [self.header(self.name)]


class ForcedRequired(_CallEmitter):
    """tool_choice "required": the constrained output is [{"name", "parameters"}, ...]."""

    def __init__(self):
        super().__init__()
        self.text = ""

    def feed(self, text: str) -> list[dict]:
        self.text += text
        return []

    def close(self) -> list[dict]:
        try:
            calls = [(c["name"], c.get("parameters", {})) for c in json.loads(self.text)]
        except (ValueError, TypeError, KeyError):  # cut by max_tokens: hand back the text
            return [{"content": self.text}] if self.text else []
        return [d for name, arguments in calls for d in self.call(name, arguments)]


def fold(deltas: list[dict]) -> dict:
    """The non-streamed message that a list of deltas adds up to."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    for d in deltas:
        if "content" in d:
            content.append(d["content"])
        for tc in d.get("tool_calls", []):
            if tc["index"] not in calls:
                calls[tc["index"]] = {"id": tc["id"], "type": "function",
                                      "function": {"name": tc["function"]["name"],
                                                   "arguments": ""}}
            calls[tc["index"]]["function"]["arguments"] += tc["function"].get("arguments", "")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        if not message["content"].strip():
            message["content"] = None
    return message


def finish_reason(parser, reason: str | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the choice ended normally after a call."""
    if reason == "stop" and parser.made_calls:
        return "tool_calls"
    return reason
