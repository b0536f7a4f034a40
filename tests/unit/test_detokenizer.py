"""Incremental detokenizer: full-decode text, reference deltas, stop strings, bounded windows.

The oracle is `FullDecodeDetokenizer` (re-decode every id each step): the incremental
`Detokenizer` must return the same delta at every step and the same `stopped_on`, and the
joined text must equal `tokenizer.decode` of all ids. Real tokenizers: SmolLM2 (byte-level
BPE, partial UTF-8 per token) and Gemma-3 (SentencePiece with byte fallback).
"""

from __future__ import annotations

import random

import pytest

from mlxkv.detokenizer import Detokenizer, FullDecodeDetokenizer

TEXT = (
    "Hello world! 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 café naïve ünïcödé — “quotes” … 日本語のテキスト、中文字符。"
    " 한국어 العربية עברית e\u0301 Z\u0351\u0368 𐀀𐀁 𓀀 🫨🪿 ꙮ ᚠᛇᚻ 𝔘𝔫𝔦 ∀x∈ℝ: x²≥0\n"
    "\tdef f(x):\n        return x  # ok\n\n"
)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tokenizer(request):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(f"{request.param}_dir")
    return AutoTokenizer.from_pretrained(str(folder))


def varied_ids(tokenizer, num_tokens: int, seed: int) -> list[int]:
    """Slices of TEXT (emoji, CJK, RTL, combining marks, byte-fallback characters, code)
    encoded back to back, with a random vocabulary id now and then."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < num_tokens:
        start = rng.randrange(len(TEXT))
        ids += tokenizer.encode(TEXT[start : start + rng.randrange(5, 80)],
                                add_special_tokens=False)
        if rng.random() < 0.3:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:num_tokens]


def stream(detok, ids: list[int], final: bool = True) -> list[str]:
    """Feed ids one token at a time, as the engine does; stop at a stop string."""
    deltas = []
    for i in range(1, len(ids) + 1):
        deltas.append(detok.update(ids[:i], final=final and i == len(ids)))
        if detok.stopped_on is not None:
            break
    return deltas


def test_long_output_equals_full_decode_delta_for_delta(tokenizer):
    ids = varied_ids(tokenizer, 2000, seed=0)
    deltas = stream(Detokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert deltas == stream(FullDecodeDetokenizer(tokenizer), ids)


def test_stop_strings_match_the_reference(tokenizer):
    rng = random.Random(1)
    for _ in range(60):
        ids = varied_ids(tokenizer, 120, seed=rng.randrange(1 << 30))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        stop = []
        for _ in range(rng.randrange(4)):  # substrings: most span token boundaries
            start = rng.randrange(len(text))
            stop.append(text[start : start + rng.randrange(1, 8)])
        stop += ["zzq"] if rng.random() < 0.3 else []
        include, final = rng.random() < 0.5, rng.random() < 0.7
        new = Detokenizer(tokenizer, stop, include)
        ref = FullDecodeDetokenizer(tokenizer, stop, include)
        assert stream(new, ids, final) == stream(ref, ids, final), (stop, include)
        assert new.stopped_on == ref.stopped_on


@pytest.mark.parametrize(("include", "expected"), [(False, "Hell"), (True, "Hello wor")])
def test_stop_string_across_tokens_is_held_then_cut(tokenizer, include, expected):
    ids = tokenizer.encode("Hello world, again", add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=["o wor", "ld,"], include_stop=include)
    deltas = stream(detok, ids)
    assert deltas[0] == "Hell"  # "o" could start "o wor": held back
    assert "".join(deltas) == expected and detok.stopped_on == "o wor"


def test_decode_window_stays_bounded(tokenizer):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = varied_ids(tokenizer, 2000, seed=2)
    detok = Detokenizer(Counting(), stop=["never seen"])
    stream(detok, ids)
    assert len(calls) <= 2 * len(ids) and max(calls) <= 16
    assert len(detok._text) + len(detok._emitted_tail) < 200  # old text is let go


class PieceTokenizer:
    """A toy SentencePiece-like decoder: join pieces, '▁' is a space, strip one leading
    space (as Llama's decoder does); optionally clean ' .' to '.' (a rewrite)."""

    def __init__(self, pieces: list[str], clean_up: bool = False):
        self.pieces, self.clean_up = pieces, clean_up

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        text = text[1:] if text.startswith(" ") else text
        return text.replace(" .", ".") if self.clean_up else text


def test_leading_space_of_every_window_is_kept():
    tok = PieceTokenizer(["▁Hello", "▁world", "!", "▁again"])
    deltas = stream(Detokenizer(tok), [0, 1, 2, 3, 1])
    assert deltas == ["Hello", " world", "!", " again", " world"]


def test_a_decoder_rewriting_read_text_does_not_stall_the_stream():
    tok = PieceTokenizer(["x", "▁", ".", "▁y"], clean_up=True)
    assert "".join(stream(FullDecodeDetokenizer(tok), [0, 1, 2, 3])) == "x "  # stalls
    assert "".join(stream(Detokenizer(tok), [0, 1, 2, 3])) == "x . y"  # keeps going


def test_no_tokenizer_yields_no_text():
    detok = Detokenizer(None, stop=["a"])
    assert detok.update([1, 2, 3], final=True) == "" and detok.stopped_on is None
