"""The GGUF-built tokenizer against llama.cpp's ids, and chat templates against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.errors import InvalidRequestError
from kvserve.loader.gguf import GGUFFile
from kvserve.loader.tokenizer import Tokenizer

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_tokens_smollm2.json").read_text())


@pytest.fixture(scope="module")
def tok(default_path):
    return Tokenizer.from_gguf(GGUFFile(default_path))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"][:24]))
def test_golden_ids_from_llama_cpp(tok, case):
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"][:24]))
def test_decode_roundtrip(tok, case):
    assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_digits_are_split_one_by_one(tok):
    """SmolLM's pre-tokenizer ("smollm") isolates every digit; plain GPT-2 splitting would not."""
    ids = tok.encode(" 2024", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == [" ", "2", "0", "2", "4"]


def test_special_ids_and_flags(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2] and tok.add_bos is False
    assert tok.encode("hi")[0] != tok.bos_token_id
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"  # specials skipped by default


TEMPLATES = {
    "bos_and_loop": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}\n"
        "{% elif m['role'] == 'tool' %}{{ raise_exception('no tool messages here') }}"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{{ eos_token if m['role'] == 'assistant' }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    ),
    "tojson_and_break": (
        "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{{ m | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}>>>{% endif %}"
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Ünïcode 😀 and \"quotes\""},
     {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Again"}],
]


def _hf_tokenizer(tok: Tokenizer, template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=template, **tok.special_tokens)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("template", ["model", *TEMPLATES])
def test_chat_template_matches_transformers(tok, template, conv, gen):
    tmpl = tok.chat_template if template == "model" else TEMPLATES[template]
    mine = Tokenizer(tok.backend, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids, add_bos=False,
                     chat_template=tmpl, special_tokens=tok.special_tokens)
    msgs = CONVERSATIONS[conv]
    expected = _hf_tokenizer(tok, tmpl).apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert mine.apply_chat_template(msgs, add_generation_prompt=gen) == expected
    ids = mine.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    assert mine.decode(ids, skip_special_tokens=False) == expected


def test_smollm_chat_prompt_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> are single special tokens


def test_template_exception_is_a_request_error(tok):
    mine = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos=False,
                     chat_template=TEMPLATES["bos_and_loop"], special_tokens=tok.special_tokens)
    with pytest.raises(InvalidRequestError, match="no tool messages here"):
        mine.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(InvalidRequestError, match="role"):
        mine.apply_chat_template([{"content": "no role"}])
