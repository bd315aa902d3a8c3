"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve import __version__
from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from kvserve.engine.outputs import CompletionOutput, RequestOutput
from kvserve.entrypoints.openai.metrics import Metrics
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.errors import InvalidRequestError, KVServeError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable",
                500: "internal_server_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_chunk(rid: str, obj: str, created: int, model: str, choices: list, include_usage: bool,
                 usage: dict | None = None) -> str:
    """One SSE event of a streamed response; `usage` is null except in the final usage chunk."""
    d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        d["usage"] = usage
    return sse(d)


def error_event(e: BaseException) -> str:
    """An error after the stream started: sent as an event, followed by [DONE]."""
    return sse({"error": {"message": str(e) or "stream ended", "type": "internal_server_error", "param": None,
                          "code": _status_of(e)}})


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _status_of(e: BaseException) -> int:
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, EngineDeadError):
        return 503
    if isinstance(e, (InvalidRequestError, KVServeError)):
        return 400
    return 500


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="kvserve", version=__version__)
    app.state.ready = True
    tokenizer = engine.engine.tokenizer
    metrics = metrics or Metrics()
    counter = {"n": 0}

    def new_id(prefix: str) -> str:
        counter["n"] += 1
        return f"{prefix}-{secrets.token_hex(8)}{counter['n']}"

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        path = request.url.path
        if path.startswith("/v1"):
            if api_key is not None:
                auth = request.headers.get("authorization", "")
                if not secrets.compare_digest(auth, f"Bearer {api_key}"):
                    return error_response(401, "invalid or missing API key", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                return error_response(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            if not app.state.ready or not engine.alive:
                return error_response(503, "server is not ready")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(KVServeError)
    async def _kv(_: Request, exc: KVServeError) -> JSONResponse:
        return error_response(_status_of(exc), str(exc))

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist (served: {served_model_name!r})", "model")

    @app.get("/health")
    async def health() -> Any:
        if app.state.ready and engine.alive:
            return PlainTextResponse("ok")
        return error_response(503, "not ready")

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prom() -> Any:
        metrics.update_gauges(engine.stats)
        body, ctype = metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kvserve", "max_model_len": engine.engine.max_model_len}]}

    async def collect(request: Request, rid: str, prompt, params) -> RequestOutput:
        """Non-streaming: run to completion unless the client disconnects first."""
        gen = engine.generate(rid, prompt, params)
        last: RequestOutput | None = None

        async def consume() -> None:
            nonlocal last
            async for out in gen:
                last = out

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    break
            await task
        finally:
            if not task.done():
                task.cancel()
            await gen.aclose()
        assert last is not None
        return last

    async def first_outputs(gens: list) -> list[RequestOutput]:
        """Each stream's first output before the response starts, so that a rejected request is an
        HTTP error (via the KVServeError handler) rather than a broken stream; closes all on failure."""
        firsts = []
        try:
            for g in gens:
                firsts.append(await g.__anext__())
        except BaseException:
            for g in gens:
                await g.aclose()
            raise
        return firsts

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def chat_logprobs(c: CompletionOutput, start: int = 0) -> dict | None:
        if c.logprobs is None:
            return None
        items = []
        for lp in c.logprobs[start:]:
            tok = tokenizer.decode([lp.token_id], skip_special_tokens=False)
            items.append({"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
                          "top_logprobs": [{"token": (t := tokenizer.decode([i], skip_special_tokens=False)),
                                            "logprob": v, "bytes": list(t.encode())} for i, v in lp.top]})
        return {"content": items}

    # -- chat ----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        params = body.to_sampling_params(default_max_tokens=None)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                               tokenize=True)
        rid = new_id("chatcmpl")
        created = int(time.time())
        model = served_model_name
        if not body.stream:
            out = await collect(request, rid, prompt, params)
            metrics.observe_finished(out)
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(c), "finish_reason": c.finish_reason} for c in out.outputs]
            n_out = sum(len(c.token_ids) for c in out.outputs)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(len(out.prompt_token_ids), n_out)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = engine.generate(rid, prompt, params)
        (first,) = await first_outputs([gen])

        def chunk(choices: list, usage_: dict | None = None) -> str:
            return stream_chunk(rid, "chat.completion.chunk", created, model, choices, include_usage, usage_)

        async def stream() -> AsyncIterator[str]:
            sent_lp = [0] * params.n
            out = first
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(params.n)])
                while True:
                    for c in out.outputs:
                        if c.delta_text or c.finish_reason:
                            lp = chat_logprobs(c, sent_lp[c.index])
                            if c.logprobs is not None:
                                sent_lp[c.index] = len(c.logprobs)
                            delta = {"content": c.delta_text} if c.delta_text else {}
                            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp,
                                          "finish_reason": c.finish_reason}])
                    if out.finished:
                        break
                    out = await gen.__anext__()
                metrics.observe_finished(out)
                if include_usage:
                    yield chunk([], usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)))
            except (KVServeError, StopAsyncIteration) as e:
                yield error_event(e)
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- completions ---------------------------------------------------------------------

    def completion_logprobs(out: RequestOutput, c: CompletionOutput, echo: bool, k: int, start: int = 0,
                            offset0: int = 0) -> dict | None:
        if c.logprobs is None:
            return None
        tokens, tlps, tops, offsets = [], [], [], []
        pos = offset0
        entries: list[tuple[int, float | None, list]] = []
        if echo and start == 0:
            for j, tid in enumerate(out.prompt_token_ids):
                lp = out.prompt_logprobs[j] if out.prompt_logprobs and j < len(out.prompt_logprobs) else None
                entries.append((tid, None if lp is None else lp.logprob, [] if lp is None else lp.top))
        for lp in c.logprobs[start:]:
            entries.append((lp.token_id, lp.logprob, lp.top))
        for tid, v, top in entries:
            t = tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append(t)
            tlps.append(v)
            tops.append(None if v is None else {tokenizer.decode([i], skip_special_tokens=False): x for i, x in top[:k]})
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": tlps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        params = body.to_sampling_params(default_max_tokens=16)
        prompts = body.prompts()
        rid = new_id("cmpl")
        created = int(time.time())
        model = served_model_name
        k = body.logprobs or 0
        if not body.stream:
            tasks = [asyncio.ensure_future(collect(request, f"{rid}-{i}", p, params)) for i, p in enumerate(prompts)]
            try:
                outs = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:  # one prompt failed: abort its siblings instead of finishing them for nobody
                    t.cancel()
                raise
            choices, n_prompt, n_out = [], 0, 0
            for i, out in enumerate(outs):
                metrics.observe_finished(out)
                n_prompt += len(out.prompt_token_ids)
                prefix = (out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)) if body.echo else ""
                for c in out.outputs:
                    n_out += len(c.token_ids)
                    choices.append({"index": i * params.n + c.index, "text": prefix + c.text,
                                    "logprobs": completion_logprobs(out, c, body.echo, k),
                                    "finish_reason": c.finish_reason})
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(n_prompt, n_out)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gens = [engine.generate(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
        firsts = await first_outputs(gens)

        def chunk(choices: list, usage_: dict | None = None) -> str:
            return stream_chunk(rid, "text_completion", created, model, choices, include_usage, usage_)

        async def stream() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, g, first: RequestOutput) -> None:
                try:
                    await queue.put((i, first))
                    if not first.finished:
                        async for o in g:
                            await queue.put((i, o))
                except BaseException as e:  # noqa: BLE001 - forwarded to the stream
                    await queue.put((i, e))

            tasks = [asyncio.ensure_future(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
            done, n_prompt, n_out = 0, 0, 0
            sent_lp: dict[tuple[int, int], int] = {}
            try:
                while done < len(gens):
                    i, out = await queue.get()
                    if isinstance(out, BaseException):
                        raise out
                    for c in out.outputs:
                        key = (i, c.index)
                        text = c.delta_text
                        echo_now = body.echo and key not in sent_lp
                        if echo_now:
                            text = (out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)) + text
                        if text or c.finish_reason or echo_now:
                            lp = completion_logprobs(out, c, echo_now, k, sent_lp.get(key, 0))
                            sent_lp[key] = len(c.logprobs) if c.logprobs is not None else 0
                            yield chunk([{"index": i * params.n + c.index, "text": text, "logprobs": lp,
                                          "finish_reason": c.finish_reason}])
                        else:
                            sent_lp.setdefault(key, 0)
                    if out.finished:
                        done += 1
                        metrics.observe_finished(out)
                        n_prompt += len(out.prompt_token_ids)
                        n_out += sum(len(c.token_ids) for c in out.outputs)
                if include_usage:
                    yield chunk([], usage(n_prompt, n_out))
            except KVServeError as e:
                yield error_event(e)
            finally:
                for t in tasks:
                    t.cancel()
                for g in gens:
                    await g.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def default_api_key(flag: str | None) -> str | None:
    return flag if flag is not None else os.environ.get("KVSERVE_API_KEY") or None
