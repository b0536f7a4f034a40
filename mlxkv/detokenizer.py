"""Incremental detokenisation with stop strings, at a per-token cost independent of length.

Only a window of recent tokens is decoded each step (the prefix-offset / read-offset
technique). The read offset is the last token boundary where the text ended on a whole
character; the prefix offset is the boundary before it, kept as left context so that
decoders which treat the first token specially (SentencePiece's leading space, a stray
UTF-8 continuation byte) give the same answer for both decodes:

    output ids   |..........|prefix ......|read ........|
                 0          prefix_offset  read_offset   len(ids)
    window text  = decode(ids[prefix_offset:])          (bounded: two short runs)
    prefix text  = decode(ids[prefix_offset:read_offset])
    new text     = window text[len(prefix text):]        (appended to the text so far)

The emitted text is the one `FullDecodeDetokenizer` (the reference twin: re-decode all
ids every step) would emit, delta for delta: a tail that is an incomplete UTF-8
character, or that could still grow into a stop string, is held back until the next
token decides it; on a stop string the text is cut before it (or after it with
include_stop_str_in_output) and the request finishes. Only the last few characters of
text (the longest stop string's worth) are kept for matching.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

_REPLACEMENT = "\ufffd"  # what decoders print for an incomplete UTF-8 sequence


def _decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    except TypeError:
        return tokenizer.decode(list(ids))


def _settled(text: str, stop: Sequence[str]) -> str:
    """Drop trailing replacement chars and any suffix that is a prefix of a stop string."""
    text = text.rstrip(_REPLACEMENT)
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text


class _StopStringText:
    """What both detokenizers are configured with, and the stop string that ended the text."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.stopped_on: str | None = None


class Detokenizer(_StopStringText):
    """Per-request text state. `tokenizer` None yields no text (token-id-only use).

    Each `update` decodes a window that spans the tokens since the last two whole-character
    boundaries, so its cost does not grow with the output (a run of tokens that never
    ends on a character boundary widens the window until one does).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_emitted_chars = 0
        self._max_stop = max(map(len, self.stop), default=0)
        self._prefix_offset = 0  # token offsets into the output ids (see the module diagram)
        self._read_offset = 0
        self._prefix_text = ""
        # The text up to the read offset, from character `_base` on; `_base` trails the
        # emitted length by the longest stop string, which is all stop matching looks back.
        self._base = 0
        self._text = ""
        self._emitted_tail = ""  # the emitted text from `_base` on

    def update(self, output_ids: Sequence[int], final: bool = False) -> str:
        """New text since the last call. Sets `stopped_on` when a stop string appears.

        Args:
            output_ids: every output token id so far; each call's ids start with the previous
                call's (the engine may repeat them once, without a stop token, at the end).
            final: the request ends with these ids: emit everything, hold nothing back.
        Returns:
            The text to append to what earlier calls returned ("" while a tail is held).
        """
        if self.tokenizer is None or self.stopped_on is not None:
            return ""
        window = _decode(self.tokenizer, output_ids[self._prefix_offset :],
                         self.skip_special_tokens)
        if window.startswith(self._prefix_text):
            new_text = window[len(self._prefix_text) :]
        elif window.endswith(_REPLACEMENT):
            return ""  # a byte run rewrote text it ends in (Gemma's byte fallback): wait
        else:
            # NOTE: the decoder rewrote text already read (a finished character turned into
            # U+FFFD, a space cleaned up before punctuation). Emitted text cannot be taken
            # back, so keep it and go on with what follows the common part.
            new_text = window[len(os.path.commonprefix([self._prefix_text, window])) :]
        text = self._text + new_text
        delta = self._emit(text, final)
        if len(output_ids) > self._read_offset and not window.endswith(_REPLACEMENT):
            self._advance(output_ids, text)
        self._forget_old_text()
        return delta

    def _emit(self, text: str, final: bool) -> str:
        """The reference algorithm on `text`, which starts at character `_base` of the output."""
        base, num_emitted = self._base, self.num_emitted_chars
        cut = base + len(text)
        for s in self.stop:
            idx = text.find(s, max(0, num_emitted - len(s)) - base)
            if idx >= 0 and (self.stopped_on is None or idx + base < cut):
                self.stopped_on = s
                cut = idx + base + (len(s) if self.include_stop else 0)
        if self.stopped_on is not None:
            text = text[: cut - base]
        elif not final:
            text = _settled(text, self.stop)
        if not text.startswith(self._emitted_tail):
            return ""
        delta = text[len(self._emitted_tail) :]
        self._emitted_tail += delta
        self.num_emitted_chars += len(delta)
        return delta

    def _advance(self, output_ids: Sequence[int], text: str) -> None:
        """The text ends on a whole character: move the read offset to the end."""
        self._text = text
        self._prefix_text = _decode(self.tokenizer, output_ids[self._read_offset :],
                                    self.skip_special_tokens)
        self._prefix_offset, self._read_offset = self._read_offset, len(output_ids)

    def _forget_old_text(self) -> None:
        read_end = self._base + len(self._text)
        keep_from = min(read_end, self.num_emitted_chars - self._max_stop)
        if keep_from > self._base:
            drop = keep_from - self._base
            self._text = self._text[drop:]
            self._emitted_tail = self._emitted_tail[drop:]
            self._base = keep_from


class FullDecodeDetokenizer(_StopStringText):
    """Reference twin of `Detokenizer`: re-decodes every output id each step (O(n) a step).

    The oracle for tests and the baseline for benchmarks/detok_cost.py; the engine uses
    `Detokenizer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.emitted = ""  # text already returned to the caller

    def update(self, output_ids: Sequence[int], final: bool = False) -> str:
        """Same contract as `Detokenizer.update`."""
        if self.tokenizer is None or self.stopped_on is not None:
            return ""
        text = _decode(self.tokenizer, output_ids, self.skip_special_tokens)
        cut = len(text)
        for s in self.stop:
            idx = text.find(s, max(0, len(self.emitted) - len(s)))
            if idx >= 0 and (self.stopped_on is None or idx < cut):
                self.stopped_on = s
                cut = idx + (len(s) if self.include_stop else 0)
        if self.stopped_on is not None:
            text = text[:cut]
        elif not final:
            text = _settled(text, self.stop)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
