"""Incremental detokenization: multi-byte characters split across tokens, stop strings split across steps."""

from __future__ import annotations

import pytest

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.loader.gguf import GGUFFile
from kvserve.loader.tokenizer import Tokenizer

TEXTS = ["Emoji 😀🎉 and flags 🇫🇷!", "中文文本：你好，世界！", "naïve café — “quotes”", "plain ascii, numbers 12345"]


@pytest.fixture(scope="module")
def tok(default_path):
    return Tokenizer.from_gguf(GGUFFile(default_path))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text)
    assert len(ids) > 3
    d = IncrementalDetokenizer(tok, tok.encode("Say:"))
    pieces = []
    for t in ids:
        before = len(d.text)
        d.add(t)
        pieces.append(d.text[before:])
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # byte-level pieces of one character
    d = IncrementalDetokenizer(tok, [])
    for t in ids[:-1]:
        d.add(t)
        assert d.text == ""
    d.add(ids[-1])
    assert d.text == "😀"


def test_stop_string_across_steps_and_holdback(tok):
    text = "The answer is forty-two, my friend."
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], stop=["forty-two"])
    shown = []
    hit = None
    for t in ids:
        hit = d.add(t)
        shown.append(d.visible_text(finished=hit is not None))
        if hit:
            break
    assert hit == "forty-two"
    assert d.text == "The answer is "
    assert all("forty" not in s for s in shown)  # a streaming client never saw the stop string's start
    d2 = IncrementalDetokenizer(tok, [], stop=["forty-two"], include_stop_str_in_output=True)
    for t in ids:
        if d2.add(t):
            break
    assert d2.text == "The answer is forty-two"
