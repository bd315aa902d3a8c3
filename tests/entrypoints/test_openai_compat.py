"""What real clients send and expect: /tokenize, /detokenize, models.retrieve, ignored OpenAI fields, null as
the default, vLLM's continuous usage stats, scoring with max_tokens 0, OpenAI's error bodies."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import TINY_NAME

MSG = [{"role": "user", "content": "hi there"}]


def _err(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] is None or isinstance(err["code"], str)  # OpenAI: a string or null, never a number
    return err


def test_tokenize_prompt_and_messages(http, oai):
    with_bos = http.post("/tokenize", json={"prompt": "hello world"}).json()
    bare = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert with_bos["tokens"][1:] == bare["tokens"] and with_bos["count"] == len(bare["tokens"]) + 1
    assert with_bos["max_model_len"] == 256 and with_bos["token_strs"] is None
    chat = http.post("/tokenize", json={"messages": MSG, "model": TINY_NAME}).json()
    r = oai.chat.completions.create(model=TINY_NAME, messages=MSG, max_tokens=1)
    assert chat["count"] == r.usage.prompt_tokens == len(chat["tokens"])
    strs = http.post("/tokenize", json={"prompt": " the", "add_special_tokens": False,
                                        "return_token_strs": True}).json()
    assert strs["token_strs"] == ["Ġthe"] and strs["count"] == 1  # " the": one merge of the tiny byte BPE


def test_detokenize_round_trip_and_errors(http):
    ids = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "hello world"}
    assert "out of vocabulary" in _err(http.post("/detokenize", json={"tokens": [1, 10**6]}), 400)["message"]
    assert "one of prompt or messages" in _err(http.post("/tokenize", json={}), 400)["message"]
    both = {"prompt": "x", "messages": MSG}
    assert "one of prompt or messages" in _err(http.post("/tokenize", json=both), 400)["message"]
    assert _err(http.post("/tokenize", json={"prompt": "x", "model": "gpt-4"}), 404)["code"] == "model_not_found"


def test_models_retrieve(http, oai):
    m = oai.models.retrieve(TINY_NAME)
    assert m.id == TINY_NAME and m.object == "model" and m.owned_by == "kvserve"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    err = _err(http.get("/v1/models/org/some-model"), 404)  # ids with a slash (HF names) are one id
    assert "org/some-model" in err["message"] and err["param"] == "model"


def test_ignored_fields_change_nothing(oai):
    plain = oai.chat.completions.create(model=TINY_NAME, messages=MSG, max_tokens=6, temperature=0)
    extra = oai.chat.completions.create(
        model=TINY_NAME, messages=MSG, max_tokens=6, temperature=0, store=False, metadata={"run": "1"},
        service_tier="auto", user="u-1", parallel_tool_calls=False, prompt_cache_key="k", safety_identifier="s")
    assert extra.choices[0].message.content == plain.choices[0].message.content
    c = oai.completions.create(model=TINY_NAME, prompt="hello", max_tokens=3, temperature=0, user="u-1",
                               extra_body={"metadata": {"a": "b"}, "service_tier": "auto"})
    assert c.usage.completion_tokens == 3


def test_null_means_default(http):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "n": None, "presence_penalty": None,
            "frequency_penalty": None, "top_p": None, "stop": None, "seed": None, "logprobs": None,
            "top_logprobs": None, "stream": None, "stream_options": None, "min_tokens": None,
            "skip_special_tokens": None, "response_format": None, "max_completion_tokens": None}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] == 4
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": None, "echo": None, "suffix": None,
                                           "best_of": None, "logprobs": None, "n": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # max_tokens' default
    assert "'not_a_field'" in _err(http.post("/v1/chat/completions", json={"messages": MSG, "not_a_field": None}),
                                   400)["message"]


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "required"}, "needs tools"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema"}}, "json_schema"),
    ("/v1/chat/completions", {"messages": MSG, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": MSG, "audio": {"voice": "alloy"}}, "audio"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # without echo nothing to return
])
def test_fields_that_would_change_the_answer_stay_400(http, path, body, needle):
    assert needle in _err(http.post(path, json=body), 400)["message"]


def _stream_events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
])
def test_continuous_usage_stats(http, path, body):
    """vLLM's extension, guidellm's default streaming mode: usage (so far) on every chunk."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    events = _stream_events(http, path, {**body, "stream_options": opts})
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages)
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 8 and events[-1]["choices"] == []
    assert len({u["prompt_tokens"] for u in usages}) == 1
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = _stream_events(http, path, {**body, "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 8


def test_max_tokens_0_with_echo_scores_the_prompt(oai, http):
    prompt = "hello world"
    s = oai.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = s.choices[0]
    n = s.usage.prompt_tokens
    assert c.text == prompt and s.usage.completion_tokens == 0 and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == n
    assert c.logprobs.token_logprobs[0] is None and all(v < 0 for v in c.logprobs.token_logprobs[1:])
    # the same numbers as the prompt part of an echo that also generates
    gen = oai.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0)
    assert gen.choices[0].logprobs.token_logprobs[:n] == c.logprobs.token_logprobs
    events = _stream_events(http, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True,
                                                      "logprobs": 1, "stream_options": {"include_usage": True}})
    body = [e for e in events if e["choices"]]
    assert "".join(e["choices"][0]["text"] for e in body) == prompt
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in body) == n
    assert body[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 0


def test_error_code_is_a_string_or_null(http):
    assert _err(http.post("/v1/chat/completions", json={"messages": MSG, "bogus": 1}), 400)["code"] is None
    assert _err(http.post("/v1/chat/completions", json={"messages": MSG, "model": "x"}), 404)["code"] == \
        "model_not_found"
    assert _err(http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}),
                400)["code"] is None


def test_ignored_fields_are_declared_and_in_the_readme():
    from pathlib import Path

    from kvserve.entrypoints.openai.protocol import (IGNORED_FIELDS, ChatCompletionRequest, ResponsesRequest,
                                                     StreamOptions)

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name in IGNORED_FIELDS:
        assert f"`{name}`" in readme, name
        if name.startswith("stream_options."):
            assert name.split(".", 1)[1] in StreamOptions.model_fields
        else:
            assert name in ChatCompletionRequest.model_fields and name in ResponsesRequest.model_fields, name


def test_long_message_text_is_not_capped_by_the_parts_bound(http):
    """A message's text is bounded by the prompt checks, not by the 2048-part bound on content lists."""
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "ab " * 1500}]})
    assert r.status_code == 200, r.text
    assert r.json()["count"] > 1500
