"""/v1/chat/completions: a chat template over the messages, then one response or an SSE stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvserve.entrypoints.openai.generation import collect, first_outputs, stream_usage, usage, usage_of
from kvserve.entrypoints.openai.limits import check_prompt, check_request
from kvserve.entrypoints.openai.logprobs import chat_logprobs
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.entrypoints.openai.sse import DONE, error_event, stream_chunk
from kvserve.entrypoints.openai.state import get_state
from kvserve.entrypoints.openai.tools import conversation, plan_tools
from kvserve.errors import KVServeError

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request) -> Any:
    st = get_state(request)
    engine, tokenizer, metrics = st.engine, st.tokenizer, st.metrics
    st.check_model(body.model)
    plan = plan_tools(body)
    params = body.to_sampling_params(default_max_tokens=None, tool_constraint=plan.constraint())
    check_request(body, st, params.max_tokens)
    messages, template_vars = conversation(body, plan, tokenizer.chat_template)
    prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages,
                                     add_generation_prompt=body.add_generation_prompt, tokenize=True, **template_vars)
    await check_prompt(st, prompt)
    rid = st.new_id("chatcmpl")
    rec = record_of(request, rid)
    created = int(time.time())
    model = st.served_model_name
    if not body.stream:
        out = await collect(engine, request, rid, prompt, params)
        metrics.observe_finished(out)
        choices = []
        for c in out.outputs:
            message, finish = plan.answer(c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message, "logprobs": chat_logprobs(tokenizer, c),
                            "finish_reason": finish})
        n_out = sum(len(c.token_ids) for c in out.outputs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage(len(out.prompt_token_ids), n_out)}

    include_usage, continuous = stream_usage(body)
    gen = engine.generate(rid, prompt, params)
    (first,) = await first_outputs(request, [gen])
    rec.observe(first)

    async def stream() -> AsyncIterator[str]:
        sent_lp = [0] * params.n
        streamers = [plan.streamer() for _ in range(params.n)]  # tool calls: held back until each is whole
        out = first

        def chunk(choices: list, usage_: dict | None = None) -> str:
            if continuous and usage_ is None:
                usage_ = usage_of(out)  # so far
            return stream_chunk(rid, "chat.completion.chunk", created, model, choices, include_usage, usage_)

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)], usage(len(first.prompt_token_ids), 0)
                        if continuous else None)
            while True:
                for c in out.outputs:
                    if c.delta_text or c.finish_reason:
                        lp = chat_logprobs(tokenizer, c, sent_lp[c.index])
                        if c.logprobs is not None:
                            sent_lp[c.index] = len(c.logprobs)
                        streamer = streamers[c.index]
                        if streamer is None:
                            delta = {"content": c.delta_text} if c.delta_text else {}
                            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp,
                                          "finish_reason": c.finish_reason}])
                            continue
                        for delta in streamer.feed(c.delta_text, final=c.finish_reason is not None):
                            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                            lp = None
                        if c.finish_reason is not None:
                            finish = "tool_calls" if streamer.calls else c.finish_reason
                            yield chunk([{"index": c.index, "delta": {}, "logprobs": lp, "finish_reason": finish}])
                if out.finished:
                    break
                out = await gen.__anext__()
                rec.observe(out)
            metrics.observe_finished(out)
            if include_usage:
                yield chunk([], usage_of(out))
        except (KVServeError, StopAsyncIteration) as e:
            yield error_event(e)
        finally:
            await gen.aclose()
        yield DONE

    return StreamingResponse(stream(), media_type="text/event-stream")
