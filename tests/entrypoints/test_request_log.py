"""One INFO line per request (id, route, status, tokens, TTFT, e2e), the reason of every 4xx, and a switch."""

from __future__ import annotations

import logging
import re

from fastapi.testclient import TestClient

from conftest import TINY_NAME

MSG = [{"role": "user", "content": "hi"}]


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvserve.requests"]


def test_one_line_per_request(http, caplog):
    caplog.set_level(logging.INFO, logger="kvserve.requests")
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 5, "ignore_eos": True})
    rid = r.json()["id"]
    (line,) = _lines(caplog)
    assert re.fullmatch(rf"{rid} POST /v1/chat/completions 200 prompt_tokens={r.json()['usage']['prompt_tokens']} "
                        r"output_tokens=5 ttft=\d+\.\d{3}s e2e=\d+\.\d{3}s", line), line
    assert caplog.records[0].levelno == logging.INFO
    caplog.clear()
    with http.stream("POST", "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3, "ignore_eos": True,
                                                      "stream": True}) as s:
        assert s.status_code == 200 and not _lines(caplog)  # a stream is logged when it ends
        s.read()
    (line,) = _lines(caplog)
    assert " POST /v1/completions 200 prompt_tokens=4 output_tokens=6 ttft=" in line and line.startswith("cmpl-")
    caplog.clear()
    http.get("/health")
    http.get("/metrics")
    assert not _lines(caplog)  # probes and scrapes are not logged
    http.get("/v1/models")
    assert re.fullmatch(r"req-\d+ GET /v1/models 200 e2e=\d+\.\d{3}s", _lines(caplog)[0])


def test_every_4xx_names_its_reason(http, caplog):
    caplog.set_level(logging.INFO, logger="kvserve.requests")
    http.post("/v1/chat/completions", json={"messages": MSG, "continuous_usage": True})
    http.post("/v1/chat/completions", json={"messages": MSG, "model": "gpt-4"})
    http.get("/v1/nope")
    a, b, c = _lines(caplog)
    assert re.fullmatch(r"req-\d+ POST /v1/chat/completions 400 e2e=\d+\.\d{3}s: unsupported field 'continuous_usage'",
                        a), a
    assert " 404 " in b and "'gpt-4' does not exist" in b and " 404 " in c and "Not Found" in c


def test_client_text_cannot_start_a_log_line(http, caplog):
    """The path and the error message carry what the client sent: a line break in them is escaped."""
    caplog.set_level(logging.INFO, logger="kvserve.requests")
    forged = "\nreq-1 POST /v1/completions 200 e2e=0.001s\u2028\r"
    http.post("/v1/chat/completions", json={"messages": MSG, "model": f"gpt-4{forged}"})
    http.get("/v1/models/a%0Areq-2%20GET%20/v1/models%20200")
    a, b = _lines(caplog)
    assert " 404 " in a and "'gpt-4\\nreq-1 POST /v1/completions 200 e2e=0.001s\\u2028\\r'" in a, a
    assert b.startswith("req-") and " GET /v1/models/a\\nreq-2 GET /v1/models 200 404 " in b, b
    assert not any(ch in a + b for ch in "\n\r\u2028")


def test_disable_log_requests(tiny_app, caplog):
    from kvserve.entrypoints.openai.app import build_app

    st = tiny_app.state.serving
    quiet = build_app(st.engine, TINY_NAME, log_requests=False)
    caplog.set_level(logging.INFO, logger="kvserve.requests")
    with TestClient(quiet) as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi", "bad": 1}).status_code == 400
    assert not _lines(caplog)


def test_cli_flag():
    from kvserve.entrypoints.cli import build_parser

    assert build_parser().parse_args(["serve", "--disable-log-requests"]).disable_log_requests is True
    assert build_parser().parse_args(["serve"]).disable_log_requests is False
