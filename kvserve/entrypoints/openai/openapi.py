"""The served /openapi.json, made to say what the server really returns.

FastAPI documents a 422 for every route with a body and `application/json` for every 200. kvserve
answers validation errors with 400 in OpenAI's error envelope, refuses with 401/404/408/413/429/503
in the same envelope (429, and the 503 of --limit-concurrency, with Retry-After), serves /health and /metrics as text/plain and /dashboard as text/html, and streams
generation routes as server-sent events: the document is patched after generation to list exactly those.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from kvserve.entrypoints.openai import stats
from kvserve.entrypoints.openai.limits import UNLIMITED_PATHS

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_WHY = {400: "invalid request (validation, limits, an unknown model or field value)", 401: "missing or wrong API key",
        404: "unknown model or route", 408: "the request ran past --request-timeout",
        413: "body or prompt too large", 429: "the queue is full (Retry-After says when to retry)",
        503: "the engine is not ready or has stopped", 500: "internal error"}
_WHY_LIMITED = "the engine is not ready or has stopped, or too many requests are in flight (--limit-concurrency; " \
               "Retry-After says when to retry)"
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
# one server-sent event: `data:` is a JSON chunk (or [DONE]); /v1/responses also names each `event:`
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
PUBLIC = ("/health", "/dashboard")  # no API key


def _error(status: int, concurrency_limited: bool = False) -> dict:
    out = {"description": _WHY_LIMITED if status == 503 and concurrency_limited else _WHY[status],
           "content": {"application/json": {"schema": _REF}}}
    if status == 429 or (status == 503 and concurrency_limited):
        out["headers"] = _RETRY_AFTER
    return out


def statuses(path: str, method: str, has_body: bool, concurrency_limited: bool = False) -> list[int]:
    """The error statuses one route can answer with (concurrency_limited: the server runs with --limit-concurrency,
    which can refuse any route but /health and /metrics with 503)."""
    out = [] if path in PUBLIC else [401]
    if has_body:  # every body names a `model`: an unknown one is a 404 (OpenAI's model_not_found)
        out += [400, 404, 413]
    if path == "/stats":  # a bad `since`
        out.append(400)
    if path.startswith("/v1/models/"):
        out.append(404)
    if path in GENERATION:
        out += [400, 404, 408, 429]
    if path.startswith("/v1") or path in ("/health", "/tokenize", "/detokenize"):
        out.append(503)
    if concurrency_limited and path not in UNLIMITED_PATHS:
        out.append(503)
    return sorted(set(out) | {500})


def patch(schema: dict[str, Any], concurrency_limited: bool = False) -> dict[str, Any]:
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    schema["components"]["schemas"]["StatsResponse"] = stats.SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: never sent
        schema["components"]["schemas"].pop(name, None)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in statuses(path, method, "requestBody" in op, concurrency_limited):
                responses[str(status)] = _error(status, concurrency_limited and path not in UNLIMITED_PATHS)
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if path == "/health":
                ok["content"] = {"text/plain": {"schema": {"type": "string", "enum": ["ok"]}}}
            elif path == "/metrics":
                ok["content"] = {"text/plain": {"schema": {"type": "string"},
                                                "example": "kvserve:num_requests_running 0.0\n"}}
            elif path == "/stats":
                ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/StatsResponse"}}}
            elif path == "/dashboard":
                ok["content"] = {"text/html": {"schema": {"type": "string"}}}
            elif path in GENERATION:
                ok["description"] = "The completion, or with `stream: true` its chunks as server-sent events"
                ok["content"] = {"application/json": {"schema": {"type": "object"}},
                                 "text/event-stream": {"schema": _SSE_EVENT}}
    return schema


def install(app: FastAPI, concurrency_limited: bool = False) -> None:
    """Serve the patched document (built once, on the first request for it)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch(FastAPI.openapi(app), concurrency_limited)  # FastAPI's generator, then the corrections
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

