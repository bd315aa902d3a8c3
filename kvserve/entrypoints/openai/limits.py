"""Bounds on what a request may ask for, checked at the edge, before the engine sees the request.

`BodyGuard` (ASGI middleware) reads a request body before any handler: larger than MAX_BODY_BYTES
(counted as it arrives, so a chunked upload without Content-Length is cut off too) is 413; bytes
that are not UTF-8, JSON that is malformed, nested deeper than MAX_JSON_DEPTH, holds a non-finite
number (NaN, Infinity, 1e999) or an unpaired surrogate are 400. Field bounds that need no server
state are on the pydantic models (protocol.py); `check_*` below add the ones that need the model.

`ConcurrencyLimit` (ASGI middleware, `--limit-concurrency N`) bounds the HTTP requests in flight
(a stream counts until its last event): one more is answered 503 in the error envelope with
Retry-After, before anything reads its body; /health and /metrics are never refused, so a
supervisor and a scraper still see an overloaded server. (uvicorn's own limit_concurrency answers
a plain-text 503, outside the API's error format.)
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING, Any

from kvserve.entrypoints.openai.errors import RETRY_AFTER_S, error_response
from kvserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from kvserve.entrypoints.openai.protocol import ResponsesRequest, _Common
    from kvserve.entrypoints.openai.state import OpenAIServingState

MAX_BODY_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 32


class BodyError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> float:
    raise BodyError(400, f"non-finite number {name} in the JSON body")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise BodyError(400, f"non-finite number {text} in the JSON body")
    return v


def _walk(v: Any, depth: int = 0) -> None:
    """Nesting depth and strings that are not Unicode text (a lone surrogate from a \\ud800 escape)."""
    if depth > MAX_JSON_DEPTH:
        raise BodyError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(400, "the JSON body holds a string that is not valid Unicode (unpaired surrogate)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _walk(k, depth + 1)
            _walk(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _walk(x, depth + 1)


def check_body(body: bytes) -> None:
    """Raise BodyError unless `body` is empty or well-formed, bounded JSON."""
    if not body:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(400, "the request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise BodyError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except BodyError:
        raise
    except ValueError:
        raise BodyError(400, "malformed JSON body") from None
    _walk(value)


class BodyGuard:
    """ASGI middleware: buffer and check the body of every request with one, then replay it to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await error_response(413, f"request body exceeds {MAX_BODY_BYTES} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            # a 4 MiB body parses in well under a second; off the event loop so streams keep flowing
            await asyncio.to_thread(check_body, body) if size > 2**16 else check_body(body)
        except BodyError as e:
            await error_response(e.status, str(e))(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        await self.app(scope, replay, send)


UNLIMITED_PATHS = ("/health", "/metrics")  # never refused by ConcurrencyLimit


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` HTTP requests in flight (UNLIMITED_PATHS aside); the next gets 503."""

    def __init__(self, app: Any, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {limit}")
        self.app = app
        self.limit = limit
        self.in_flight = 0  # read and changed on the event loop only: no lock

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await error_response(503, f"too many requests in flight ({self.limit}, --limit-concurrency); retry later",
                                 code="server_overloaded", retry_after=RETRY_AFTER_S)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def check_request(body: _Common | ResponsesRequest, st: OpenAIServingState, max_tokens: int | None,
                  name: str = "max_tokens") -> None:
    """Bounds that depend on the served model: max_tokens (/v1/responses: max_output_tokens) against
    max_model_len, token ids against the vocab."""
    if max_tokens is not None and max_tokens > st.max_model_len:
        raise InvalidRequestError(f"{name} ({max_tokens}) exceeds max_model_len ({st.max_model_len})")
    vocab = st.engine.model_config.vocab_size
    for key in getattr(body, "logit_bias", None) or {}:
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise InvalidRequestError(f"logit_bias: key {key!r} is not a token id in [0, {vocab})")
    for t in getattr(body, "stop_token_ids", None) or []:
        if not 0 <= t < vocab:
            raise InvalidRequestError(f"stop_token_ids: token id {t} is out of vocabulary (size {vocab})")


async def check_prompt(st: OpenAIServingState, prompt: str | list[int]) -> None:
    """Token ids outside the vocab, or a prompt that leaves no room under max_model_len, are 400 here;
    a long text is counted off the event loop."""
    if isinstance(prompt, str):
        if 4 * len(prompt) + 2 < st.max_model_len:  # a character is at most 4 byte tokens (+ BOS/EOS)
            return
        n = len(await asyncio.to_thread(st.tokenizer.encode, prompt))
    else:
        vocab = st.engine.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of vocabulary (size {vocab})")
        n = len(prompt)
    if n >= st.max_model_len:
        raise InvalidRequestError(f"prompt ({n} tokens) leaves no room under max_model_len ({st.max_model_len})")
