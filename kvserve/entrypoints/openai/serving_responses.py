"""/v1/responses (OpenAI's Responses API): one assistant message, whole or as the named stream events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.openai.generation import collect, first_outputs
from kvserve.entrypoints.openai.limits import check_prompt, check_request
from kvserve.entrypoints.openai.protocol import ResponsesRequest
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.entrypoints.openai.sse import sse
from kvserve.entrypoints.openai.errors import error_body, status_of
from kvserve.entrypoints.openai.state import get_state
from kvserve.errors import KVServeError

router = APIRouter()


def _usage(out: RequestOutput) -> dict:
    n_in, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + n_out}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(msg_id: str, text: str | None) -> dict:
    """The output message item; `text` None: still in progress, no content yet."""
    return {"type": "message", "id": msg_id, "role": "assistant",
            "status": "in_progress" if text is None else "completed", "content": [] if text is None else [_part(text)]}


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Any:
    st = get_state(request)
    st.check_model(body.model)
    params = body.to_sampling_params()
    check_request(body, st, params.max_tokens, "max_output_tokens")
    prompt = await asyncio.to_thread(st.tokenizer.apply_chat_template, body.messages(), add_generation_prompt=True,
                                     tokenize=True)
    await check_prompt(st, prompt)
    rid = st.new_id("resp")
    msg_id = st.new_id("msg")
    rec = record_of(request, rid)
    created = int(time.time())

    def response(status: str, out: RequestOutput | None = None) -> dict:
        incomplete = status == "incomplete"
        return {"id": rid, "object": "response", "created_at": created, "status": status,
                "model": st.served_model_name, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "output": [] if out is None else [_message(msg_id, out.outputs[0].text)],
                "usage": None if out is None else _usage(out), "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "metadata": body.metadata or {}, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False,
                "previous_response_id": None, "user": body.user}

    def final_status(out: RequestOutput) -> str:
        return "incomplete" if out.outputs[0].finish_reason == "length" else "completed"

    if not body.stream:
        out = await collect(st.engine, request, rid, prompt, params)
        st.metrics.observe_finished(out)
        return response(final_status(out), out)

    gen = st.engine.generate(rid, prompt, params)
    (first,) = await first_outputs(request, [gen])
    rec.observe(first)
    seq = iter(range(1 << 62))

    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": next(seq), **data})

    async def stream() -> AsyncIterator[str]:
        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        out = first
        try:
            yield event("response.created", response=response("in_progress"))
            yield event("response.in_progress", response=response("in_progress"))
            yield event("response.output_item.added", output_index=0, item=_message(msg_id, None))
            yield event("response.content_part.added", **where, part=_part(""))
            while True:
                delta = out.outputs[0].delta_text
                if delta:
                    yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
                if out.finished:
                    break
                out = await gen.__anext__()
                rec.observe(out)
            st.metrics.observe_finished(out)
            text = out.outputs[0].text
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=_part(text))
            yield event("response.output_item.done", output_index=0, item=_message(msg_id, text))
            status = final_status(out)
            yield event(f"response.{status}", response=response(status, out))
        except (KVServeError, StopAsyncIteration) as e:
            err = error_body(status_of(e), str(e) or "stream ended")["error"]
            yield event("error", code=err["code"], message=err["message"], param=None)
        finally:
            await gen.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")
