"""--limit-concurrency: requests in flight beyond the bound get 503 in the OpenAI error envelope with
Retry-After, /health and /metrics never; the bound frees as requests end (a real uvicorn on loopback,
in this process, over the tiny app's engine)."""

from __future__ import annotations

import select
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from conftest import TINY_NAME
from kvserve.entrypoints.openai.app import build_app
from serve_helpers import free_port

LIMIT = 2
BODY = {"prompt": [5, 17, 42, 99, 3], "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited(tiny_app):
    engine = tiny_app.state.serving.engine
    observers = list(engine.engine.step_observers)
    app = build_app(engine, TINY_NAME, limit_concurrency=LIMIT, log_requests=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield url
    server.should_exit = True
    t.join(10)
    engine.engine.step_observers[:] = observers  # the shared engine as the other tests found it


def _hold(port: int) -> socket.socket:
    """A request that stays in flight: its headers promise a body that never finishes arriving."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: 1000\r\n\r\n{")
    return s


def _hold_all(port: int, timeout: float = 5) -> list[socket.socket]:
    """LIMIT held requests, all admitted: a seat still taken by a request that is ending (the server notices a
    closed stream a moment later) answers a hold with 503 at once; then try again until `timeout`."""
    deadline = time.time() + timeout
    while True:
        held = [_hold(port) for _ in range(LIMIT)]
        readable, _, _ = select.select(held, [], [], 0.3)  # an admitted hold gets no answer: its body is pending
        if not readable:
            return held
        for s in held:
            s.close()
        assert time.time() < deadline, "the seats never all came free"
        time.sleep(0.05)


def test_requests_beyond_the_limit_get_503_with_the_error_envelope(limited, http):
    port = int(limited.rsplit(":", 1)[1])
    ref = http.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
    # finished requests (plain and streamed) give their seat back
    for _ in range(3):
        assert httpx.post(f"{limited}/v1/completions", json=BODY, timeout=30).json()["choices"][0]["text"] == ref
    with httpx.stream("POST", f"{limited}/v1/completions", json={**BODY, "stream": True}, timeout=30) as r:
        assert r.iter_lines().__next__().startswith("data: ")  # and the client leaves mid-stream
    held = _hold_all(port)
    try:
        r = httpx.get(f"{limited}/v1/models", timeout=5)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "service_unavailable" and err["code"] == "server_overloaded"
        assert "--limit-concurrency" in err["message"]
        r = httpx.post(f"{limited}/v1/completions", json=BODY, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
        assert httpx.get(f"{limited}/health", timeout=5).status_code == 200  # exempt: probes see a live server
        assert httpx.get(f"{limited}/metrics", timeout=5).status_code == 200
        held.pop().close()  # one client leaves: its seat frees
        deadline = time.time() + 5
        while (r := httpx.post(f"{limited}/v1/completions", json=BODY, timeout=30)).status_code == 503 \
                and time.time() < deadline:
            time.sleep(0.02)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref
    finally:
        for s in held:
            s.close()


def test_the_openapi_document_lists_the_limit(limited, http):
    doc = httpx.get(f"{limited}/openapi.json", timeout=5).json()
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/stats", "get"),
                         ("/version", "get")):
        r503 = doc["paths"][path][method]["responses"]["503"]
        assert "--limit-concurrency" in r503["description"] and "Retry-After" in r503["headers"], path
        assert r503["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "503" not in doc["paths"]["/metrics"]["get"]["responses"]
    assert "Retry-After" not in doc["paths"]["/health"]["get"]["responses"]["503"].get("headers", {})
    # without the flag: the unlimited server documents no such 503
    plain = http.get("/openapi.json").json()
    assert "503" not in plain["paths"]["/stats"]["get"]["responses"]
    assert "limit-concurrency" not in plain["paths"]["/v1/models"]["get"]["responses"]["503"]["description"]
    assert "Retry-After" in plain["paths"]["/v1/completions"]["post"]["responses"]["429"]["headers"]
