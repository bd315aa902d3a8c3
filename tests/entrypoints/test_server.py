"""A real `kvserve serve` process on a free port, driven with the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from serve_helpers import drain, free_port, stop_server, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


class Server:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "KVSERVE_API_KEY": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(self.port),
             "--kv-cache-memory", "384MiB", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        drain(self.proc)
        wait_healthy(self.proc, self.url)

    def stop(self) -> tuple[int, str]:
        return stop_server(self.proc)


@pytest.fixture(scope="module", params=[1, 2], ids=["dp1", "dp2"])
def server(request):
    """The suite runs against one engine, then against 2 data-parallel replicas behind the server."""
    s = Server() if request.param == 1 else Server("--data-parallel-size", "2")
    yield s
    rc, out = s.stop()
    assert rc == 0, out
    assert "Traceback" not in out, out
    assert re.search(r"^INFO kvserve.requests: chatcmpl-\S+ POST /v1/chat/completions 200 prompt_tokens=\d+ ", out,
                     re.M), out  # request lines reach the log at the CLI's default level


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


MSG = [{"role": "user", "content": "Name three colors."}]


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert "version" in httpx.get(f"{server.url}/version").json()


def test_chat_non_stream_and_stream_agree(client):
    full = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0)
    c = full.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1 and len({ch.created for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [ch for ch in chunks if ch.choices]
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert body[-1].choices[0].finish_reason == c.finish_reason
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == c.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_max_completion_tokens_n_stop_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    two = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, n=2, temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip().split()[0] if text.strip() else "Paris"
    s = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  stop=[stop])
    assert stop not in s.choices[0].text and s.choices[0].finish_reason == "stop"


def test_completions_prompt_forms_echo_logprobs(client):
    tok_ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=4, temperature=0)
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert tok_ids.choices[0].text == text.choices[0].text and text.usage.prompt_tokens == 5
    many = client.completions.create(model=MODEL, prompt=["Hello", "One, two,"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    ids2 = client.completions.create(model=MODEL, prompt=[[504, 3575], [19556]], max_tokens=2, temperature=0)
    assert len(ids2.choices) == 2 and ids2.usage.prompt_tokens == 3
    e = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = e.choices[0]
    assert c.text.startswith("Hello there")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == e.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for it in items:
        assert len(it.top_logprobs) == 3 and it.top_logprobs[0].token == it.token  # greedy = top-1


class Weather(BaseModel):
    city: str
    condition: Literal["sunny", "cloudy", "rain", "snow"]
    temperature_c: int = Field(ge=-60, le=60)
    tags: list[str] = Field(max_length=3)


def test_parse_pydantic_response_format(client):
    """The openai client's parse(): a JSON schema from a pydantic model, the answer parsed into it."""
    msgs = [{"role": "user", "content": "Describe the weather in Paris today as JSON."}]
    r = client.chat.completions.parse(model=MODEL, messages=msgs, response_format=Weather, max_tokens=64, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    w = r.choices[0].message.parsed
    assert isinstance(w, Weather) and w.city, r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": ["Paris", "London", "Rome"]})
    assert c.choices[0].text == "Paris"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_calls_required_and_named(client):
    """tool_choice required (not streamed) and a named function (streamed): calls that always parse."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    named = {"type": "function", "function": {"name": "get_weather"}}
    args, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL], tool_choice=named,
                                                max_tokens=40, temperature=0, stream=True):
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and json.loads(args) == json.loads(call.function.arguments)


def test_async_client_concurrent(server):
    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(ac.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=8, temperature=0)
            for i in range(6)))
        stream = await ac.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                             stream=True)
        parts = [ch.choices[0].text async for ch in stream if ch.choices]
        await ac.close()
        return rs, parts

    rs, parts = asyncio.run(main())
    assert all(r.choices[0].message.content for r in rs)
    assert "".join(parts)


def _post(server, path, body, headers=None):
    return httpx.post(f"{server.url}{path}", content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
     400, "invalid json"),
    ({"messages": MSG, "max_tokens": 100000}, 400, "max_model_len (8192)"),
    ({"messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"messages": MSG, "top_p": 0}, 400, "top_p"),
    ({"messages": MSG, "n": 0}, 400, "n must be"),
    ({"messages": []}, 400, "messages"),
    ({"messages": MSG, "model": "gpt-4"}, 404, "gpt-4"),
    ('{"messages": [', 400, "JSON"),
])
def test_error_envelopes(server, body, status, needle):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_oversized_body_and_bad_token_ids(server):
    r = _post(server, "/v1/completions", {"prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413 and "error" in r.json()
    r = _post(server, "/v1/completions", {"prompt": [1, 99999999]})
    assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"]


def test_one_bad_prompt_in_a_batch_leaves_nothing_running(server):
    # the valid prompt alone would run for minutes (3000 tokens): it must be aborted, not finished for nobody
    r = _post(server, "/v1/completions", {"prompt": [[1, 2, 3], [1, 99999999]], "max_tokens": 3000, "ignore_eos": True})
    assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"]
    deadline = time.time() + 10
    while time.time() < deadline and _metric(server, "kvserve:num_requests_running") > 0:
        time.sleep(0.2)
    assert _metric(server, "kvserve:num_requests_running") == 0


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


def test_storm_with_disconnects(server, client):
    """50 concurrent streams, every other one dropped mid-stream; the rest complete and match greedy."""
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(50)]
    expected = {i: client.chat.completions.create(model=MODEL, messages=prompts[i], max_tokens=16,
                                                  temperature=0).choices[0].message.content
                for i in range(1, 50, 10)}

    async def one(ac, i):
        stream = await ac.chat.completions.create(model=MODEL, messages=prompts[i], max_tokens=16, temperature=0,
                                                  stream=True)
        text = ""
        n = 0
        async for ch in stream:
            n += 1
            if ch.choices:
                text += ch.choices[0].delta.content or ""
            if i % 2 == 0 and n == 2:
                await stream.close()  # disconnect mid-stream
                return None
        return text

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
        res = await asyncio.gather(*(one(ac, i) for i in range(50)))
        await ac.close()
        return res

    res = asyncio.run(main())
    for i, text in enumerate(res):
        if i % 2:
            assert text, i
            if i in expected:
                assert text == expected[i]
    deadline = time.time() + 10
    while time.time() < deadline and _metric(server, "kvserve:num_requests_running") > 0:
        time.sleep(0.2)
    assert _metric(server, "kvserve:num_requests_running") == 0
    assert _metric(server, "kvserve:num_requests_waiting") == 0
    assert _metric(server, "kvserve:kv_cache_usage_perc") == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert "kvserve:time_to_first_token_seconds_bucket" in text and "kvserve:e2e_request_latency_seconds_count" in text


def test_api_key_and_queue_limit():
    s = Server("--api-key", "sekret", "--max-waiting-requests", "0")
    try:
        r = _post(s, "/v1/chat/completions", {"messages": MSG})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{s.url}/v1/models", headers={"authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(f"{s.url}/health").status_code == 200  # not behind the key
        r = _post(s, "/v1/chat/completions", {"messages": MSG}, {"authorization": "Bearer sekret"})
        assert r.status_code == 429 and "waiting" in r.json()["error"]["message"]
    finally:
        rc, out = s.stop()
    assert rc == 0, out


def test_health_503_while_loading_then_200():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(port),
                             "--kv-cache-memory", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and 200 not in seen:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                seen.add(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] is None  # OpenAI: a string or null
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert seen == {503, 200}, out
    assert proc.returncode == 0, out


def test_serve_bad_model_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(free_port()),
                        "--model", str(tmp_path / "missing.gguf")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.gguf: no such file" in r.stderr and "Traceback" not in r.stderr


def test_data_parallel_routing_metrics(server, client, request):
    """Per-replica gauges; with 2 replicas a repeated prompt follows its cached prefix."""
    long_msg = [{"role": "user", "content": "Describe the colour of the sky on a clear summer day, in detail."}]
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=long_msg, max_tokens=2, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    if "data-parallel-size" not in " ".join(server.proc.args):
        assert "kvserve:replica_requests_routed{" not in text
        return
    routed = [float(v) for v in re.findall(r'^kvserve:replica_requests_routed\{replica="\d"\} ([0-9.e+-]+)$', text, re.M)]
    by_prefix = re.findall(r'^kvserve:replica_requests_routed_by_prefix\{replica="\d"\} ([0-9.e+-]+)$', text, re.M)
    assert len(routed) == 2 and sum(routed) >= 2
    assert sum(float(v) for v in by_prefix) >= 1
    assert re.search(r'^kvserve:replica_kv_cache_usage_perc\{replica="1"\} ', text, re.M)
