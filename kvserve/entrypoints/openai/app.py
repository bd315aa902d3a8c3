"""build_app: the FastAPI app of the OpenAI-compatible server, its guard middleware and error handlers."""

from __future__ import annotations

import logging
import os
import secrets
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve import __version__
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.entrypoints.openai import (openapi, serving_chat, serving_completion, serving_models, serving_responses,
                                        serving_stats, serving_tokenization)
from kvserve.entrypoints.openai.errors import APIError, error_response, status_of
from kvserve.entrypoints.openai.generation import ClientDisconnected
from kvserve.entrypoints.openai.limits import MAX_BODY_BYTES, BodyGuard, ConcurrencyLimit
from kvserve.entrypoints.openai.metrics import Metrics
from kvserve.entrypoints.openai.request_log import RequestLogMiddleware
from kvserve.entrypoints.openai.state import OpenAIServingState
from kvserve.errors import KVServeError

logger = logging.getLogger(__name__)
TOKENIZATION_PATHS = ("/tokenize", "/detokenize")  # API routes outside /v1 (as vLLM serves them)


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None, metrics_public: bool = False, log_requests: bool = True,
              limit_concurrency: int | None = None) -> FastAPI:
    """limit_concurrency: HTTP requests in flight beyond which the next is answered 503 (None: no bound)."""
    app = FastAPI(title="kvserve", version=__version__)
    app.state.ready = True  # the CLI turns it False while draining on SIGTERM
    app.state.serving = OpenAIServingState(engine=engine, served_model_name=served_model_name,
                                           metrics=metrics or Metrics(), tokenizer=engine.tokenizer,
                                           max_model_len=engine.max_model_len, api_key=api_key,
                                           metrics_public=metrics_public)
    for i, replica in enumerate(getattr(engine, "replicas", [engine])):  # one engine, or data-parallel replicas
        app.state.serving.steps.attach(replica.engine, i)
    app.add_middleware(BodyGuard)  # inner: runs after Guard (no body is read for a request without the key)
    app.add_middleware(Guard)
    if limit_concurrency is not None:  # outside Guard: a refused request costs no key check, no body read
        app.add_middleware(ConcurrencyLimit, limit=limit_concurrency)
    if log_requests:  # outermost (plain ASGI, as the guards): it sees the guards' refusals too
        app.add_middleware(RequestLogMiddleware)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(APIError, _api)
    app.add_exception_handler(KVServeError, _kv)
    app.add_exception_handler(ClientDisconnected, _gone)
    app.add_exception_handler(Exception, _internal)
    for module in (serving_models, serving_chat, serving_completion, serving_responses, serving_tokenization,
                   serving_stats):
        app.include_router(module.router)
    openapi.install(app, concurrency_limited=limit_concurrency is not None)
    return app


def default_api_key(flag: str | None) -> str | None:
    return flag if flag is not None else os.environ.get("KVSERVE_API_KEY") or None


class Guard:
    """The API key on every route but /health and /dashboard (and /metrics, /stats with --metrics-public); on /v1
    also the declared body size and readiness; all before anything reads the body.

    Plain ASGI, not `app.middleware("http")`: Starlette's BaseHTTPMiddleware hides a client's disconnect
    from `request.is_disconnected()`, and a request whose client left must be aborted at once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = _refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(scope: Scope) -> Response | None:
    app = scope["app"]
    st: OpenAIServingState = app.state.serving
    headers = Headers(scope=scope)
    path = scope["path"]
    # /dashboard is a static page with no data in it: it asks for the key and sends it to /stats itself
    public = path in ("/health", "/dashboard") or (path in ("/metrics", "/stats") and st.metrics_public)
    if st.api_key is not None and not public:
        auth = headers.get("authorization", "")
        if not secrets.compare_digest(auth.encode(), f"Bearer {st.api_key}".encode()):
            return error_response(401, "invalid or missing API key", code="invalid_api_key")
    if not (path.startswith("/v1") or path in TOKENIZATION_PATHS):
        return None
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return error_response(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not app.state.ready or not st.engine.alive:
        return error_response(503, "server is not ready")
    return None


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        msg = f"unsupported field {param!r}"
    elif first.get("type") == "json_invalid":
        msg = "malformed JSON body"
    else:
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return error_response(400, msg, param=param)


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _api(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def _kv(_: Request, exc: KVServeError) -> JSONResponse:
    return error_response(status_of(exc), str(exc))


async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
    return error_response(499, "client closed the request")  # nobody reads it; the request is already aborted


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the client's fault: logged here; the client gets the envelope, never a traceback or a path."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")
