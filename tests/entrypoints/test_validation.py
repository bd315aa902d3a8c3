"""Bad input is refused at the edge: the OpenAI error envelope with 400/413, before the engine sees it."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers import TINY_VOCAB
from serve_helpers import TinyServer

REF = [5, 17, 42, 99, 3]
GREEDY = {"prompt": REF, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
MSG = [{"role": "user", "content": "hi"}]

# in the server process: any request other than the reference prompt that reaches the engine is a 500
GUARD = f"""
from kvserve.engine.llm_engine import LLMEngine
_add = LLMEngine.add_request
def _only_ref(self, rid, prompt, *a, **k):
    if prompt != {REF!r}:
        raise RuntimeError("the engine saw a request the edge should have refused")
    return _add(self, rid, prompt, *a, **k)
LLMEngine.add_request = _only_ref
"""


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = TinyServer(tiny_dir, pre=GUARD)
    s.ref = httpx.post(f"{s.url}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    yield s
    rc, out = s.stop()
    assert rc == 0, out
    assert "the engine saw" not in out, out


def _raw(server, path: str, content, headers=None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def _envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/kvserve/" not in r.text
    return err


def chat(**kw):
    return ("/v1/chat/completions", {"messages": MSG, **kw})


def cmpl(**kw):
    return ("/v1/completions", {"prompt": [1, 2, 3], **kw})


BAD_FIELDS = [
    (chat(n=33), "n"),
    (cmpl(n=1000000), "n"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (cmpl(logprobs=6), "logprobs"),
    (chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    (chat(logit_bias={"5": 101}), "logit_bias"),
    (chat(logit_bias={str(TINY_VOCAB): 1}), "logit_bias"),
    (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(logit_bias={"x": 1}), "logit_bias"),
    (chat(stop=[f"s{i}" for i in range(17)]), "stop"),
    (chat(stop="x" * 257), "stop"),
    (chat(stop_token_ids=[TINY_VOCAB]), "stop_token_ids"),
    (chat(stop_token_ids=list(range(65))), "stop_token_ids"),
    (chat(max_tokens=129), "max_model_len (128)"),
    (chat(max_completion_tokens=2**40), "max_completion_tokens"),
    (cmpl(max_tokens=10**30), "max_tokens"),
    (chat(seed=2**64), "seed"),
    (chat(top_k=2**40), "top_k"),
    (chat(priority=2**40), "priority"),
    (chat(min_tokens=-1), "min_tokens"),
    (("/v1/chat/completions", {"messages": MSG * 2049}), "messages"),
    (("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]}), "max_model_len (128)"),
    (("/v1/completions", {"prompt": "word " * 200}), "max_model_len (128)"),
    (("/v1/completions", {"prompt": [1] * 128}), "max_model_len (128)"),
    (("/v1/completions", {"prompt": [[1, 2]] * 65}), "prompt"),
    (("/v1/completions", {"prompt": [1, TINY_VOCAB]}), "out of vocabulary"),
    (chat(user="u" * 257), "user"),
    (("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2049}]}),
     "content"),
    (chat(metadata={str(i): "v" for i in range(17)}), "metadata"),
    (chat(prompt_cache_key="k" * 257), "prompt_cache_key"),
    # issue20's routes, under the same edge checks
    (("/tokenize", {"prompt": "x" * (2**20 + 1)}), "prompt"),
    (("/tokenize", {"messages": MSG * 2049}), "messages"),
    (("/detokenize", {"tokens": [TINY_VOCAB]}), "out of vocabulary"),
    (("/v1/responses", {"input": "hi", "max_output_tokens": 129}), "max_model_len (128)"),
    (("/v1/responses", {"input": "hi", "max_output_tokens": 2**40}), "max_output_tokens"),
    (("/v1/responses", {"input": "word " * 200}), "max_model_len (128)"),
    (("/v1/responses", {"input": "hi", "instructions": "word " * 200}), "max_model_len (128)"),
    (("/v1/responses", {"input": "hi", "instructions": "x" * (2**20 + 1)}), "instructions"),
    (("/v1/responses", {"input": MSG * 2049}), "input"),
    (("/v1/responses", {"input": "hi", "seed": 2**64}), "seed"),
    (("/v1/responses", {"input": "hi", "top_k": 2**40}), "top_k"),
    (("/v1/responses", {"input": "hi", "metadata": {"k" * 65: "v"}}), "metadata"),
]


@pytest.mark.parametrize("req, needle", BAD_FIELDS, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_FIELDS)])
def test_bounded_fields(server, req, needle):
    path, body = req
    err = _envelope(_raw(server, path, json.dumps(body)), 400)
    assert needle in err["message"] or needle == err["param"], err


BAD_BODIES = [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    (b'{"prompt": [1, 2], "temperature": NaN}', "non-finite"),
    (b'{"prompt": [1, 2], "temperature": Infinity}', "non-finite"),
    (b'{"prompt": [1, 2], "top_p": -Infinity}', "non-finite"),
    (b'{"prompt": [1, 2], "temperature": 1e999}', "non-finite"),
    (b'{"prompt": [1, 2], "logit_bias": {"5": 1e400}}', "non-finite"),
    (b'{"prompt": "\\ud800 lone"}', "surrogate"),
    (b'{"prompt": [1, 2], "x": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
    (b'{"prompt": [1, 2], "x": ' + b"[" * 200000 + b"]" * 200000 + b"}", "nested"),
    (b'{"prompt": [1, 2], "max_tokens": ' + b"9" * 5000 + b"}", "JSON"),
    (b'{"prompt": [1, 2]', "JSON"),
]


@pytest.mark.parametrize("content, needle", BAD_BODIES, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_BODIES)])
def test_malformed_bodies(server, content, needle):
    for path in ("/v1/completions", "/v1/chat/completions"):
        err = _envelope(_raw(server, path, content), 400)
        assert needle in err["message"], err


def test_score_only_passes_the_edge(server):
    """max_tokens 0 with echo (completions' prompt scoring) is not refused by the max_tokens bounds."""
    r = httpx.post(f"{server.url}/v1/completions", json={**GREEDY, "max_tokens": 0, "echo": True, "logprobs": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 0


def test_body_size_limit_with_and_without_content_length(server):
    big = json.dumps({"prompt": "x" * (5 * 2**20)}).encode()
    for path in ("/v1/completions", "/v1/responses", "/tokenize"):
        assert _envelope(_raw(server, path, big), 413)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 2**16
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert "content-length" not in r.request.headers
    assert _envelope(r, 413)["code"] == "payload_too_large"


def test_server_unchanged_after_bad_input(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60)
        assert r.json()["choices"][0]["text"] == server.ref
    st = server.wait_idle()
    assert st["kvserve:num_requests_running"] == 0 and st['kvserve:kv_cache_blocks{state="used"}'] == 0
