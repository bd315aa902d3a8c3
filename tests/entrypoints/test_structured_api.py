"""Structured outputs over the OpenAI API (tiny random Llama, in process): response_format json_object and
json_schema, vLLM's structured_outputs and guided_* on both endpoints, streaming, the openai client's
parse(), and 400s that name the problem."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import TINY_NAME

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["size", "count"], "additionalProperties": False}


class Pick(BaseModel):
    size: Literal["S", "M", "L"]
    count: int = Field(ge=0, le=99)
    label: str = Field(max_length=6)


def _chat(http, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 60, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _text(http, **body) -> str:
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 60, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    (c,) = r.json()["choices"]
    assert c["finish_reason"] == "stop", c
    return c["text"]


def test_response_format_json_schema_and_json_object(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        c = _chat(http, response_format=fmt, temperature=1.0, seed=seed)["choices"][0]
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
    # json_object: any object; a small object schema keeps the random model inside max_tokens
    c = _chat(http, response_format={"type": "json_object"}, max_tokens=8)["choices"][0]
    assert c["message"]["content"].startswith("{")  # cut at max_tokens, but an object from its first token
    assert _chat(http, response_format={"type": "text"}, max_tokens=4)["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllm_fields_on_both_endpoints(http, path):
    def gen(**constraint) -> str:
        if path == "/v1/completions":
            return _text(http, **constraint)
        (c,) = _chat(http, **constraint)["choices"]
        assert c["finish_reason"] == "stop", c
        return c["message"]["content"]

    assert re.fullmatch(r"[0-9]{4}", gen(guided_regex=r"[0-9]{4}"))
    assert re.fullmatch(r"[a-f]{2}-[0-9]", gen(structured_outputs={"regex": r"[a-f]{2}-[0-9]"}))
    assert gen(guided_choice=["north", "south"]) in ("north", "south")
    assert gen(structured_outputs={"choice": ["up", "down"]}) in ("up", "down")
    jsonschema.validate(json.loads(gen(guided_json=SCHEMA)), SCHEMA)
    jsonschema.validate(json.loads(gen(structured_outputs={"json": json.dumps(SCHEMA)})), SCHEMA)
    assert re.fullmatch(r"(ab){1,2}!", gen(guided_grammar='start: "ab" "ab"? "!"'))
    assert gen(structured_outputs={"grammar": 'root ::= "yes" | "no"'}) in ("yes", "no")  # GBNF


def test_streaming_and_n(http):
    with http.stream("POST", "/v1/chat/completions", json={"messages": MSG, "max_tokens": 40, "n": 3,
                                                            "temperature": 1.0, "seed": 1, "stream": True,
                                                            "guided_regex": r"[xyz]{3,6}\."}) as r:
        assert r.status_code == 200
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    texts, finish = ["", "", ""], [None] * 3
    for e in events:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["delta"].get("content", "")
            finish[ch["index"]] = ch["finish_reason"] or finish[ch["index"]]
    assert all(re.fullmatch(r"[xyz]{3,6}\.", t) for t in texts), texts
    assert finish == ["stop"] * 3


def test_openai_client_parse(oai):
    for seed in range(2):
        r = oai.chat.completions.parse(model=TINY_NAME, messages=MSG, response_format=Pick, max_tokens=80,
                                       temperature=1.0, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Pick) and r.choices[0].finish_reason == "stop"
    with oai.chat.completions.stream(model=TINY_NAME, messages=MSG, response_format=Pick, max_tokens=80,
                                     temperature=0) as s:
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Pick)


BAD = [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "Invalid type: nope"),
    (dict(response_format={"type": "json_schema"}), "json_schema"),
    (dict(response_format={"type": "xml"}), "response_format.type"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}), "name"),
    (dict(guided_regex="a(b"), "unclosed group"),
    (dict(guided_grammar="start: nothing_here"), "unknown name"),
    (dict(guided_choice=[]), "choice"),
    (dict(guided_json="{not json"), "not valid JSON"),
    (dict(guided_regex="a", guided_choice=["a"]), "guided_choice, guided_regex"),
    (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex, response_format"),
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "exactly one"),
    (dict(structured_outputs={"bogus": 1}), "structured_outputs.bogus"),
]


@pytest.mark.parametrize("body, needle", BAD, ids=[n for _, n in BAD])
def test_bad_constraints_are_400(http, oai, body, needle):
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_completions_bad_constraint_is_400_and_server_goes_on(http, oai):
    r = http.post("/v1/completions", json={"prompt": "hi", "guided_json": {"type": "object", "minProperties": 3,
                                                                           "maxProperties": 1}})
    assert r.status_code == 400 and "invalid json" in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=TINY_NAME, prompt="hi", extra_body={"guided_regex": "("})
    assert _text(http, guided_choice=["fine"]) == "fine"
