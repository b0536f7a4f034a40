"""Structured outputs: per-request JSON-schema token masks from llguidance, on the engine thread.

`StructuredOutputs` keeps one llguidance matcher per constrained sequence (forks of an n > 1
request get their own, built from their own output ids), masks the logits rows of the
constrained sequences right before sampling, and advances a matcher when its token is
appended. Unconstrained rows are never touched, so a constrained request changes nothing
for the rest of the continuous batch.

Invariant: a live matcher has consumed exactly its sequence's output_token_ids. Matchers
are made lazily from those ids, which is what makes forks, preemption (recompute keeps the
output ids) and prefix-cache hits (the prompt never reaches the grammar) need no care.

The masks are computed while the forward pass evaluates (`mx.async_eval` first), so their
cost overlaps the model's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from mlxkv.errors import InvalidRequestError
from mlxkv.request import Request

log = logging.getLogger("mlxkv.structured")

# Compact JSON (", " and ": ", no free whitespace): small models otherwise wander into
# endless newlines, and a schema may still choose its own with "x-guidance".
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=256)
def json_grammar(schema: str) -> str:
    """The llguidance grammar for a JSON schema (text).

    Raises:
        InvalidRequestError: the text is not JSON, or llguidance cannot compile the schema;
            the message names the problem (param "response_format").
    """
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}",
                                  "response_format") from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the JSON schema cannot be used: {error}", "response_format")
    return grammar


def check_json_schema(schema: str, param: str = "response_format") -> None:
    """Raise InvalidRequestError (naming `param`) when `schema` cannot constrain an output."""
    try:
        json_grammar(schema)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param) from exc


def _unpack(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 [rows, ceil(V/32)] bitmask -> bool [rows, vocab_size] (bit i of word j: 32j+i)."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


class StructuredOutputs:
    """Token masks for the constrained sequences of a batch.

    Args:
        tokenizer: the engine's tokenizer (an mlx-lm TokenizerWrapper or an HF fast
            tokenizer); only read when the first constrained request is sampled.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._matchers: dict[str, llguidance.LLMatcher] = {}

    def validate(self, json_schema: str | None) -> None:
        """Raise InvalidRequestError when a request's schema cannot be compiled."""
        if json_schema is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured outputs need a tokenizer",
                                          "response_format")
            check_json_schema(json_schema)

    def _ll_tokenizer(self, vocab_size: int) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            eos = getattr(self.tokenizer, "eos_token_ids", None) or None
            self._lltokenizer = llguidance.hf.from_tokenizer(
                hf, n_vocab=vocab_size, eos_token=sorted(eos) if eos else None)
        return self._lltokenizer

    def _matcher(self, req: Request, vocab_size: int) -> llguidance.LLMatcher:
        matcher = self._matchers.get(req.request_id)
        if matcher is None:
            grammar = json_grammar(req.params.json_schema)
            matcher = llguidance.LLMatcher(self._ll_tokenizer(vocab_size), grammar, log_level=0)
            if req.output_token_ids:
                matcher.consume_tokens(list(req.output_token_ids))
            self._matchers[req.request_id] = matcher
        return matcher

    def apply(self, logits: mx.array, requests: Sequence[Request]) -> mx.array:
        """Logits [S, V] with every token a constrained row's grammar forbids at -inf.

        Row i belongs to requests[i]; rows of unconstrained requests come back unchanged.
        Returns `logits` itself when no row is constrained.
        """
        rows = [i for i, req in enumerate(requests) if req.params.json_schema is not None]
        if not rows:
            return logits
        mx.async_eval(logits)  # the masks below are computed while the forward pass runs
        vocab_size = logits.shape[-1]
        bitmask = np.full((len(rows), (vocab_size + 31) // 32), -1, dtype=np.int32)
        for k, i in enumerate(rows):
            matcher = self._matcher(requests[i], vocab_size)
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, k)
        allowed = np.ones(logits.shape, dtype=bool)
        allowed[rows] = _unpack(bitmask, vocab_size)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), logits.dtype))

    def advance(self, req: Request, token_id: int) -> None:
        """Feed a sequence's newly appended token to its matcher (no-op if unconstrained).

        Raises:
            RuntimeError: the grammar rejected the token (a masking bug, never expected).
        """
        matcher = self._matchers.get(req.request_id)
        if matcher is None or matcher.is_stopped():  # done (ignore_eos runs on unconstrained)
            return
        if not matcher.consume_token(token_id) or matcher.is_error():
            raise RuntimeError(f"grammar rejected token {token_id}: {matcher.get_error()}")

    def release(self, request_id: str) -> None:
        """Forget a finished sequence's matcher."""
        self._matchers.pop(request_id, None)

    @property
    def num_live(self) -> int:
        return len(self._matchers)
