"""The server never dies of one request, and exits (non-zero) when its engine cannot go on."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from serve_helpers import SLOW_STEP, TinyServer

GREEDY = {"prompt": [5, 17, 42, 99, 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True}

# in the server process: an add of a prompt starting 7, 7, 7 holds the engine thread for a while; the
# engine rejects a prompt starting 9, 9 (as it did out-of-vocab ids before the edge checked them)
SLOW_ADD = """
import time
from kvserve.engine.llm_engine import LLMEngine
from kvserve.errors import InvalidRequestError
_add = LLMEngine.add_request
def _slow(self, rid, prompt, *a, **k):
    if isinstance(prompt, list) and prompt[:3] == [7, 7, 7]:
        time.sleep(1.0)
    if isinstance(prompt, list) and prompt[:2] == [9, 9]:
        raise InvalidRequestError("rejected by the engine")
    return _add(self, rid, prompt, *a, **k)
LLMEngine.add_request = _slow
"""

# in the server process: the 3rd engine step raises (an internal invariant breaking)
BROKEN_STEP = """
from kvserve.engine.llm_engine import LLMEngine
_step, _calls = LLMEngine.step, [0]
def _broken(self):
    _calls[0] += 1
    if _calls[0] == 3:
        raise AssertionError("injected invariant failure")
    return _step(self)
LLMEngine.step = _broken
"""


def _complete(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=kw.pop("timeout", 60), **kw)


def test_bad_request_cancelled_before_the_engine_takes_it(tiny_dir):
    """The issue's reproduction: a prompt the engine rejects, whose client gives up while the engine is busy."""
    import asyncio

    s = TinyServer(tiny_dir, pre=SLOW_ADD)
    try:
        ref = _complete(s.url, GREEDY).json()["choices"][0]["text"]

        async def main():
            async with httpx.AsyncClient(base_url=s.url) as c:
                gate = asyncio.ensure_future(c.post("/v1/completions", json={**GREEDY, "prompt": [7, 7, 7, 1]},
                                                    timeout=60))
                await asyncio.sleep(0.3)  # the engine thread is inside the gate's add
                for prompt in ([9, 9, 1], [[1, 2], [9, 9]]):
                    try:
                        await c.post("/v1/completions", json={**GREEDY, "prompt": prompt}, timeout=0.2)
                    except httpx.TimeoutException:
                        pass
                    else:
                        raise AssertionError("expected the client to time out while the engine was busy")
                return await gate

        assert asyncio.run(main()).status_code == 200
        time.sleep(1.0)
        assert httpx.get(f"{s.url}/health").status_code == 200
        r = _complete(s.url, {**GREEDY, "prompt": [9, 9, 1]})
        assert r.status_code == 400 and "rejected by the engine" in r.json()["error"]["message"]
        r = _complete(s.url, {**GREEDY, "prompt": [1, 99199426]})
        assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"]
        for _ in range(3):
            assert _complete(s.url, GREEDY).json()["choices"][0]["text"] == ref
        st = s.wait_idle()
        assert st["kvserve:num_requests_running"] == 0 and st['kvserve:kv_cache_blocks{state="used"}'] == 0
    finally:
        rc, out = s.stop()
    assert rc == 0, out
    assert "Traceback" not in out, out


def test_a_stdout_nobody_reads_does_not_stall_the_server(tiny_dir):
    """Issue #19's hang: the server's output is a pipe nobody reads (full at 64 KiB). The request log line of
    each request used to be written from the event loop, so once the pipe was full every route, /health
    included, waited for a reader. Now later requests are answered at once, and SIGTERM still ends the
    process, with nobody reading still."""
    s = TinyServer(tiny_dir, read_output=False)
    try:
        bad = {"prompt": [1], "x" * 3000: 1}  # a 400 whose ~3 KB message ("unsupported field 'xxx…'") is logged
        for _ in range(40):  # ~120 KB of request log
            assert _complete(s.url, bad, timeout=5).status_code == 400
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
        assert _complete(s.url, GREEDY, timeout=5).json()["usage"]["completion_tokens"] == 8
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=15) == 0 and time.time() - t0 < 10  # draining, then 2 s for the output
    finally:
        rc, out = s.stop()
    assert rc == 0, out[-2000:]
    assert re.search(r"POST /v1/completions 400 e2e=\S+: unsupported field 'x{3000}'\n", out), out[:2000]


def _stream_events(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_engine_crash_fails_streams_then_exits_nonzero(tiny_dir):
    s = TinyServer(tiny_dir, "--fatal-grace-period", "1.5", pre=BROKEN_STEP)
    t0 = None
    try:
        events = _stream_events(s.url, {**GREEDY, "max_tokens": 50})
        t0 = time.time()
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] is None and "engine stopped" in err["message"]
        assert any("choices" in json.loads(e) for e in events[:-2])  # it had started streaming
        r = httpx.get(f"{s.url}/health", timeout=2)
        assert r.status_code == 503 and r.json()["error"]["code"] is None
        assert _complete(s.url, GREEDY, timeout=5).status_code == 503
        rc = s.proc.wait(timeout=15)
        assert time.time() - t0 < 10
    finally:
        rc, out = s.stop()
    assert rc == 1, out
    assert "engine crashed" in out


def test_keep_alive_on_fatal_keeps_answering_503(tiny_dir):
    s = TinyServer(tiny_dir, "--fatal-grace-period", "0.5", "--keep-alive-on-fatal", pre=BROKEN_STEP)
    try:
        events = _stream_events(s.url, {**GREEDY, "max_tokens": 50})
        assert json.loads(events[-2])["error"]["code"] is None
        time.sleep(2.0)
        assert s.proc.poll() is None
        assert httpx.get(f"{s.url}/health", timeout=2).status_code == 503
    finally:
        rc, out = s.stop()
    assert rc == 0, out


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == pid:
            out.append((int(d), cmd))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["--tensor-parallel-size", "--pipeline-parallel-size"], ids=["tp2", "pp2"])
def test_worker_killed_mid_stream_fails_streams_and_exits(tiny_dir, parallel):
    """`serve --tensor-parallel-size 2` (or `--pipeline-parallel-size 2`: rank 1 holds the last layer), two
    streams in flight, SIGKILL the worker process: both streams end with an error event then [DONE], /health
    turns 503, and the server exits 1 within 10 s of the kill."""
    s = TinyServer(tiny_dir, parallel, "2", "--fatal-grace-period", "1", pre=SLOW_STEP)
    killed_at = None
    try:
        workers = [pid for pid, cmd in _children(s.proc.pid) if "multiprocessing.spawn" in cmd
                   and "resource_tracker" not in cmd]
        assert len(workers) == 1, _children(s.proc.pid)
        started = threading.Barrier(3, timeout=60)
        results: list[list[str]] = []

        def stream(i: int) -> None:
            body = {**GREEDY, "prompt": [5, 17, 42 + i], "max_tokens": 100, "stream": True}
            events = []
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            started.wait()
            results.append(events)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait()  # both streams have tokens: kill the worker mid-stream
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.time()
        for t in threads:
            t.join(30)
        assert len(results) == 2
        for events in results:
            assert events[-1] == "[DONE]", events[-3:]
            err = json.loads(events[-2])["error"]
            assert "engine stopped" in err["message"] and "rank 1" in err["message"], err
            assert "Traceback" not in err["message"] and "/" not in err["message"], err  # no source path
            assert sum("choices" in json.loads(e) for e in events[:-2]) < 100  # cut short
        assert time.time() - killed_at < 5  # the streams ended within seconds of the kill
        if s.proc.poll() is None:  # within the grace period: not healthy any more
            assert httpx.get(f"{s.url}/health", timeout=2).status_code == 503
        s.proc.wait(timeout=max(0.1, 10 - (time.time() - killed_at)))
        assert time.time() - killed_at < 10
    finally:
        rc, out = s.stop()
    assert rc == 1, out
    assert "engine crashed" in out and "rank 1" in out, out
