"""The OpenAI error envelope: the JSON body, APIError, and the status each engine error maps to."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from kvserve.engine.async_engine import EngineDeadError, QueueFullError, RequestTimeoutError
from kvserve.errors import InvalidRequestError, KVServeError

RETRY_AFTER_S = 1  # the Retry-After of a 429, and of a 503 for too many requests in flight

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout",
               413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable",
               500: "internal_server_error"}


# The `code` of a status when the raiser names none (OpenAI's spelling where it has one); any other status: null
ERROR_CODES = {401: "invalid_api_key", 408: "request_timeout", 413: "payload_too_large", 429: "rate_limit_exceeded",
               500: "internal_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: `code` is a string (e.g. "model_not_found") or null, never the status."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else ERROR_CODES.get(status)}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    """The envelope as a response; a 429 always says Retry-After, another status when `retry_after` is given."""
    if retry_after is None and status == 429:
        retry_after = RETRY_AFTER_S
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def status_of(e: BaseException) -> int:
    """The HTTP status for an exception raised while serving a request."""
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, RequestTimeoutError):
        return 408
    if isinstance(e, EngineDeadError):
        return 503
    if isinstance(e, (InvalidRequestError, KVServeError)):
        return 400
    return 500
