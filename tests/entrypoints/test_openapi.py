"""The served /openapi.json tells the truth: schemathesis generates requests from it against a live
server, and every response must be a documented status with a documented content type and schema
(the check that found 400-vs-422, text/plain health and metrics, and an engine killed by bad input)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from serve_helpers import TinyServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = TinyServer(tiny_dir, "--max-num-seqs", "8")
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize",
                                  "/detokenize", "/v1/models/{model_id}", "/v1/models", "/health", "/metrics", "/version",
                                  "/stats", "/dashboard"])
def test_every_response_is_documented(server, path):
    """Requests generated from the schema (valid and not): each answer a documented status, content
    type and body, and never a 5xx."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    ops = [r.ok() for r in api.get_all_operations() if r.ok().path == path]
    assert ops, f"{path} is not in the document"
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                           response_schema_conformance], timeout=30)

        check()


def test_the_engine_survives_the_fuzzing_and_holds_nothing(server, request):
    """Run after the generated cases (same module): the server still serves, and no request or KV
    block is left behind by all that bad input."""
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    st = server.wait_idle()
    assert st["kvserve:num_requests_running"] == 0 and st["kvserve:num_requests_waiting"] == 0
    assert st['kvserve:kv_cache_blocks{state="used"}'] == 0


def test_documented_statuses_and_types(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"200", "400", "401", "408", "413", "429", "503"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/health"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert "401" not in doc["paths"]["/dashboard"]["get"]["responses"]
    assert set(doc["paths"]["/dashboard"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    stats = doc["paths"]["/stats"]["get"]["responses"]
    assert {"200", "400", "401"} <= set(stats)
    assert stats["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/StatsResponse"}
    assert httpx.get(f"{server.url}/health").headers["content-type"].startswith("text/plain")
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1], "max_tokens": -1})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
