"""/v1/completions: one or more prompts, then one response or an SSE stream merging their outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.openai.generation import collect, first_outputs, stream_usage, usage, usage_of
from kvserve.entrypoints.openai.limits import check_prompt, check_request
from kvserve.entrypoints.openai.logprobs import completion_logprobs
from kvserve.entrypoints.openai.protocol import CompletionRequest
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.entrypoints.openai.sse import DONE, error_event, stream_chunk
from kvserve.entrypoints.openai.state import get_state
from kvserve.errors import KVServeError

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = get_state(request)
    engine, tokenizer, metrics = st.engine, st.tokenizer, st.metrics
    st.check_model(body.model)
    params = body.to_sampling_params(default_max_tokens=16)
    check_request(body, st, params.max_tokens)
    prompts = body.prompts()
    for p in prompts:
        await check_prompt(st, p)
    rid = st.new_id("cmpl")
    rec = record_of(request, rid)
    score = body.score_only  # max_tokens 0 + echo: the one generated token is dropped from the answer
    created = int(time.time())
    model = st.served_model_name
    k = body.logprobs or 0
    if not body.stream:
        tasks = [asyncio.ensure_future(collect(engine, request, f"{rid}-{i}", p, params))
                 for i, p in enumerate(prompts)]
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
            prefix = ""
            if body.echo:
                prefix = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)
            for c in out.outputs:
                n_out += 0 if score else len(c.token_ids)
                skip = len(c.logprobs or ()) if score else 0
                choices.append({"index": i * params.n + c.index, "text": prefix + ("" if score else c.text),
                                "logprobs": completion_logprobs(tokenizer, out, c, body.echo, k, skip),
                                "finish_reason": "length" if score else c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage(n_prompt, n_out)}

    include_usage, continuous = stream_usage(body)
    gens = [engine.generate(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
    firsts = await first_outputs(request, gens)

    def chunk(choices: list, usage_: dict | None = None) -> str:
        return stream_chunk(rid, "text_completion", created, model, choices, include_usage, usage_)

    def so_far(out: RequestOutput) -> dict | None:  # vLLM's continuous usage: this prompt's, so far
        if not continuous:
            return None
        return usage(len(out.prompt_token_ids), 0) if score else usage_of(out)

    async def stream() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, g: AsyncGenerator[RequestOutput, None], first: RequestOutput) -> None:
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
                rec.observe(out)
                for c in out.outputs:
                    key = (i, c.index)
                    text = "" if score else c.delta_text
                    echo_now = body.echo and key not in sent_lp
                    if echo_now:
                        text = (out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)) + text
                    if text or c.finish_reason or echo_now:
                        start = len(c.logprobs or ()) if score else sent_lp.get(key, 0)
                        lp = completion_logprobs(tokenizer, out, c, echo_now, k, start)
                        sent_lp[key] = len(c.logprobs) if c.logprobs is not None else 0
                        finish = ("length" if c.finish_reason else None) if score else c.finish_reason
                        yield chunk([{"index": i * params.n + c.index, "text": text, "logprobs": lp,
                                      "finish_reason": finish}], so_far(out))
                    else:
                        sent_lp.setdefault(key, 0)
                if out.finished:
                    done += 1
                    metrics.observe_finished(out)
                    n_prompt += len(out.prompt_token_ids)
                    n_out += 0 if score else sum(len(c.token_ids) for c in out.outputs)
            if include_usage:
                yield chunk([], usage(n_prompt, n_out))
        except KVServeError as e:
            yield error_event(e)
        finally:
            for t in tasks:
                t.cancel()
            for g in gens:
                if not g.ag_running:  # one a pump is inside ends (and aborts its request) as that pump is cancelled
                    await g.aclose()
        yield DONE

    return StreamingResponse(stream(), media_type="text/event-stream")
