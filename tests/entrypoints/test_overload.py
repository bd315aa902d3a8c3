"""Overload is refused early and politely (429 + Retry-After); a request past its deadline ends and frees."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from serve_helpers import SLOW_STEP, TinyServer

BODY = {"prompt": [5, 17, 42, 99, 3], "max_tokens": 20, "temperature": 0, "ignore_eos": True}


def test_full_queue_answers_429_and_admitted_requests_finish(tiny_dir):
    s = TinyServer(tiny_dir, "--max-num-seqs", "1", "--max-waiting-requests", "2", pre=SLOW_STEP)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                tasks = []
                for i in range(8):
                    tasks.append(asyncio.ensure_future(c.post("/v1/completions", json={**BODY, "seed": i})))
                    await asyncio.sleep(0.05)  # one running, two waiting: the rest find the queue full
                return await asyncio.gather(*tasks)

        rs = asyncio.run(main())
        codes = [r.status_code for r in rs]
        assert codes.count(429) >= 3 and set(codes) == {200, 429}, codes
        for r in rs:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_exceeded"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 20
        assert s.wait_idle()['kvserve:kv_cache_blocks{state="used"}'] == 0
    finally:
        rc, out = s.stop()
    assert rc == 0, out


def test_request_timeout_ends_and_frees_the_request(tiny_dir):
    s = TinyServer(tiny_dir, "--request-timeout", "0.5", pre=SLOW_STEP)
    try:
        t0 = time.time()
        r = httpx.post(f"{s.url}/v1/completions", json={**BODY, "max_tokens": 100}, timeout=60)
        assert r.status_code == 408 and "request-timeout" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "request_timeout"
        assert time.time() - t0 < 1.5
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**BODY, "max_tokens": 100, "stream": True},
                          timeout=60) as resp:
            events = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        st = s.wait_idle()
        assert st["kvserve:num_requests_running"] == 0 and st['kvserve:kv_cache_blocks{state="used"}'] == 0
        ok = httpx.post(f"{s.url}/v1/completions", json={**BODY, "max_tokens": 5}, timeout=60)
        assert ok.status_code == 200  # a short one fits in its deadline
    finally:
        rc, out = s.stop()
    assert rc == 0, out
