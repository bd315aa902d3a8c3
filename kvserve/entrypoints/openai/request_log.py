"""One log line per request, as uvicorn and vLLM print them: id, route, status, tokens, TTFT, e2e,
and for an error the message the client got. `kvserve serve --disable-log-requests` turns it off."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import count

from fastapi import Request

from kvserve.engine.outputs import RequestOutput

logger = logging.getLogger("kvserve.requests")
QUIET_PATHS = frozenset({"/health", "/metrics", "/stats", "/dashboard"})  # polled by probes and scrapers: not logged
_SCOPE_KEY = "kvserve.request_record"
_serial = count(1)


@dataclass
class RequestRecord:
    start: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: f"req-{next(_serial)}")
    first_token: float | None = None
    _tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # engine request id -> (prompt, output)

    def observe(self, out: RequestOutput) -> None:
        """Called with every engine output of the request (several engine requests for a list of prompts)."""
        n_out = sum(len(c.token_ids) for c in out.outputs)
        if n_out and self.first_token is None:
            self.first_token = time.perf_counter()
        self._tokens[out.request_id] = (len(out.prompt_token_ids), n_out)

    def line(self, method: str, path: str, status: int, reason: str | None) -> str:
        parts = [self.request_id, method, path, str(status)]
        if self._tokens:
            parts += [f"prompt_tokens={sum(p for p, _ in self._tokens.values())}",
                      f"output_tokens={sum(o for _, o in self._tokens.values())}"]
            if self.first_token is not None:
                parts.append(f"ttft={self.first_token - self.start:.3f}s")
        parts.append(f"e2e={time.perf_counter() - self.start:.3f}s")
        return _escaped(" ".join(parts) + (f": {reason}" if reason else ""))


def _escaped(s: str) -> str:
    """Line breaks and other unprintable characters as Python escapes: the path and the error message carry
    the client's text, and a client must not be able to start a log line of its own."""
    return s if s.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def record_of(request: Request, request_id: str | None = None) -> RequestRecord:
    """The request's record (a detached one when logging is off); `request_id` names it in the log."""
    rec = request.scope.get(_SCOPE_KEY)
    if rec is None:
        rec = request.scope[_SCOPE_KEY] = RequestRecord()
    if request_id is not None:
        rec.request_id = request_id
    return rec


def _reason(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace") or None


class RequestLogMiddleware:
    """Pure ASGI (so that a stream is logged when it ends, not when its headers go out)."""

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        rec = scope[_SCOPE_KEY] = RequestRecord()
        status, error = 500, bytearray()

        async def send_logged(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body" and status >= 400 and len(error) < 4096:
                error.extend(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            reason = _reason(bytes(error)) if status >= 400 else None
            logger.log(logging.WARNING if status >= 500 else logging.INFO,
                       "%s", rec.line(scope["method"], scope["path"], status, reason))
