"""Server-sent event framing for streamed responses."""

from __future__ import annotations

import json
from typing import Any

from kvserve.entrypoints.openai.errors import error_body, status_of

DONE = "data: [DONE]\n\n"


# Characters a JSON string may hold raw that str.splitlines() (and so httpx's aiter_lines) takes for line
# ends: a client reading the stream line by line would get half an event. Escaped, the JSON is the same.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def stream_chunk(rid: str, obj: str, created: int, model: str, choices: list, include_usage: bool,
                 usage: dict | None = None) -> str:
    """One SSE event of a streamed response; `usage` is null except in the final usage chunk."""
    d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return sse(d)


def error_event(e: BaseException) -> str:
    """An error after the stream started: sent as an event, followed by [DONE]."""
    return sse(error_body(status_of(e), str(e) or "stream ended"))
