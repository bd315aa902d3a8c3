"""--api-key guards every route but /health (/metrics too unless --metrics-public); no traceback or internal
path in any response; no CORS headers unless configured."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import TinyServer

# in the server process: the chat template raises an unexpected error naming an internal path
BROKEN_TEMPLATE = """
from kvserve.loader.tokenizer import Tokenizer
def _boom(self, *a, **k):
    raise RuntimeError("/opt/internal/secret.py exploded")
Tokenizer.apply_chat_template = _boom
"""
KEY = {"authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = TinyServer(tiny_dir, "--api-key", "s3cret", pre=BROKEN_TEMPLATE)
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/metrics", "/stats", "/version", "/openapi.json", "/docs", "/v1/models", "/nope"])
def test_key_required_everywhere_but_health(server, path):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer s3cret-and-more"},
                    {"authorization": "Bearer s3crét".encode()}, {"authorization": "s3cret"}):
        r = httpx.get(f"{server.url}{path}", headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}{path}", headers=KEY)
    assert r.status_code == (404 if path == "/nope" else 200)
    if path == "/nope":
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# issue20's POST routes: behind the key too (only /health is open)
POSTS = [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]}),
         ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
         ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2})]


@pytest.mark.parametrize("path, body", POSTS, ids=[p for p, _ in POSTS])
def test_key_required_on_post_routes(server, path, body):
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}{path}", json=body, headers=KEY, timeout=60)
    # /v1/responses renders the chat template, which this server's BROKEN_TEMPLATE turns into a 500
    assert r.status_code == (500 if path == "/v1/responses" else 200), r.text


def test_internal_errors_show_no_traceback_or_path(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=KEY, json={"messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert r.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in r.text and "/opt/internal" not in r.text and "kvserve/" not in r.text


def test_no_cors_unless_configured(server):
    pre = httpx.options(f"{server.url}/v1/models", headers={**KEY, "origin": "http://evil.example",
                                                           "access-control-request-method": "GET"})
    get = httpx.get(f"{server.url}/v1/models", headers={**KEY, "origin": "http://evil.example"})
    for r in (pre, get):
        assert not any(h.startswith("access-control-") for h in r.headers), r.headers


def test_metrics_public(tiny_dir):
    s = TinyServer(tiny_dir, "--api-key", "s3cret", "--metrics-public")
    try:
        assert httpx.get(f"{s.url}/metrics").status_code == 200
        assert httpx.get(f"{s.url}/stats").status_code == 200  # the same rule as /metrics
        assert httpx.get(f"{s.url}/version").status_code == 401
    finally:
        rc, out = s.stop()
    assert rc == 0, out
