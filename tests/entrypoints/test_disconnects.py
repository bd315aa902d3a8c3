"""A client that goes away frees what it held: a storm of streams dropped at four different points."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve_helpers import SLOW_STEP, TinyServer

N = 200
MAX_TOKENS = 16


def _body(i: int, stream: bool = True) -> dict:
    return {"prompt": [1 + i % 7, 2 + i % 11, 3 + i % 13, 40 + i], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = TinyServer(tiny_dir, "--max-num-seqs", "16")
    yield s
    rc, out = s.stop()
    assert rc == 0, out
    assert "Traceback" not in out, out


async def _drop_after_send(port: int, i: int, stream: bool = True, wait: float = 0.0) -> None:
    """Send the request and hang up `wait` seconds later, before any answer: it is queued or in prefill."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({**_body(i, stream), "max_tokens": 60}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    await asyncio.sleep(wait)
    writer.close()
    await writer.wait_closed()


async def _stream(c: httpx.AsyncClient, i: int, kind: int) -> str | None:
    """kind 1: drop once the response starts; 2: after 3 text events; 3: after the finishing event (before
    [DONE]); 4: read it all and return the text."""
    text, events = "", 0
    async with c.stream("POST", "/v1/completions", json=_body(i)) as r:
        assert r.status_code == 200
        if kind == 1:
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            events += 1
            if kind == 2 and events == 3:
                return None
            if kind == 3 and ch["finish_reason"]:
                return None
    return text


def test_disconnect_storm_frees_everything(server):
    survivors = [i for i in range(N) if i % 5 == 4]
    ref = {i: httpx.post(f"{server.url}/v1/completions", json=_body(i, stream=False), timeout=60).json()
           ["choices"][0]["text"] for i in survivors}

    async def main():
        limits = httpx.Limits(max_connections=N, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            jobs = [_drop_after_send(server.port, i) if i % 5 == 0 else _stream(c, i, i % 5) for i in range(N)]
            return await asyncio.gather(*jobs)

    res = asyncio.run(main())
    for i in survivors:
        assert res[i] == ref[i], i
    st = server.wait_idle()
    assert st["kvserve:num_requests_running"] == 0 and st["kvserve:num_requests_waiting"] == 0
    assert st['kvserve:kv_cache_blocks{state="used"}'] == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=_body(4, stream=False), timeout=60).json()[
        "choices"][0]["text"] == ref[4]




def test_dropped_while_queued_never_runs(tiny_dir):
    """Streaming and non-streaming requests whose clients leave while they wait behind the only seat are
    aborted from the queue: they are never scheduled (the prefix cache never looks their prompt up)."""
    s = TinyServer(tiny_dir, "--max-num-seqs", "1", pre=SLOW_STEP)
    try:
        before = s.wait_idle()["kvserve:prefix_cache_queries"]

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                hog = asyncio.ensure_future(c.post("/v1/completions", json={**_body(0, False), "max_tokens": 60}))
                await asyncio.sleep(0.3)
                for stream in (False, True):
                    await _drop_after_send(s.port, 1, stream=stream, wait=0.3)
                return await hog

        assert asyncio.run(main()).status_code == 200
        st = s.wait_idle()
        assert st["kvserve:num_requests_running"] == 0 and st['kvserve:kv_cache_blocks{state="used"}'] == 0
        assert st["kvserve:prefix_cache_queries"] - before == len(_body(0)["prompt"])  # the hog's prompt only
    finally:
        rc, out = s.stop()
    assert rc == 0, out
