"""Incremental detokenisation with stop strings.

Text is re-decoded from the output ids and only the new, settled part is emitted: a tail
that is an incomplete UTF-8 character, or that could still become a stop string, is held
back until the next token decides it. On a stop string the text is cut before it (or
after it with include_stop_str_in_output) and the request finishes.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Per-request text state. `tokenizer` None yields no text (token-id-only use)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.emitted = ""  # text already returned to the caller
        self.stopped_on: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        try:
            return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)
        except TypeError:
            return self.tokenizer.decode(list(ids))

    def update(self, output_ids: Sequence[int], final: bool = False) -> str:
        """New text since the last call. Sets `stopped_on` when a stop string appears."""
        if self.tokenizer is None or self.stopped_on is not None:
            return ""
        text = self._decode(output_ids)
        cut = len(text)
        for s in self.stop:
            idx = text.find(s, max(0, len(self.emitted) - len(s)))
            if idx >= 0 and (self.stopped_on is None or idx < cut):
                self.stopped_on = s
                cut = idx + (len(s) if self.include_stop else 0)
        if self.stopped_on is not None:
            text = text[:cut]
        elif not final:
            text = self._settled(text)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

    def _settled(self, text: str) -> str:
        """Drop a trailing replacement char and any suffix that is a prefix of a stop string."""
        text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold] if hold else text
