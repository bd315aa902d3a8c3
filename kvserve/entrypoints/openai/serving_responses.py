"""/v1/responses (OpenAI's Responses API): an assistant message and/or function calls, whole or as the
named stream events. Tools use the chat API's tool plan (tools.py): the same prompt, constraint and parser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.openai.errors import error_body, status_of
from kvserve.entrypoints.openai.generation import collect, first_outputs
from kvserve.entrypoints.openai.limits import check_prompt, check_request
from kvserve.entrypoints.openai.protocol import ResponsesRequest
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.entrypoints.openai.sse import sse
from kvserve.entrypoints.openai.state import get_state
from kvserve.entrypoints.openai.tools import conversation, plan_response_tools
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


def _function_call(item_id: str, call: dict, done: bool = True) -> dict:
    """A function_call output item from a chat tool call ({"id", "function": {"name", "arguments"}})."""
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if done else "", "status": "completed" if done else "in_progress"}


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Any:
    st = get_state(request)
    st.check_model(body.model)
    items = body.messages()
    plan = plan_response_tools(body, items)
    params = body.to_sampling_params(plan.constraint())
    check_request(body, st, params.max_tokens, "max_output_tokens")
    messages, template_vars = conversation(items, plan, st.tokenizer.chat_template)
    prompt = await asyncio.to_thread(st.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                     tokenize=True, **template_vars)
    await check_prompt(st, prompt)
    rid = st.new_id("resp")
    msg_id = st.new_id("msg")
    rec = record_of(request, rid)
    created = int(time.time())
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]

    def output_items(out: RequestOutput) -> list[dict]:
        message, _ = plan.answer(out.outputs[0].text, out.outputs[0].finish_reason)
        calls = message.get("tool_calls") or []
        items = [_message(msg_id, message["content"])] if message.get("content") or not calls else []
        return items + [_function_call(st.new_id("fc"), c) for c in calls]

    def response(status: str, output: list[dict] | None = None, out: RequestOutput | None = None) -> dict:
        incomplete = status == "incomplete"
        return {"id": rid, "object": "response", "created_at": created, "status": status,
                "model": st.served_model_name, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "output": output or [],
                "usage": None if out is None else _usage(out), "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "metadata": body.metadata or {}, "parallel_tool_calls": plan.parallel,
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(), "tools": tools,
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False,
                "previous_response_id": None, "user": body.user}

    def final_status(out: RequestOutput) -> str:
        return "incomplete" if out.outputs[0].finish_reason == "length" else "completed"

    if not body.stream:
        out = await collect(st.engine, request, rid, prompt, params)
        st.metrics.observe_finished(out)
        return response(final_status(out), output_items(out), out)

    gen = st.engine.generate(rid, prompt, params)
    (first,) = await first_outputs(request, [gen])
    rec.observe(first)
    seq = iter(range(1 << 62))

    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": next(seq), **data})

    async def stream() -> AsyncIterator[str]:
        """Items open as their first piece arrives: the message at its first text (only then, when the
        request has tools; at once without), each function call when the parser has it whole."""
        streamer = plan.streamer()
        done: list[dict] = []  # finished output items, in order
        msg: dict[str, Any] = {"index": None, "text": ""}  # the message item: its output index, its text so far
        out = first

        def open_message() -> list[str]:
            msg["index"] = len(done)
            where = {"item_id": msg_id, "output_index": msg["index"], "content_index": 0}
            return [event("response.output_item.added", output_index=msg["index"], item=_message(msg_id, None)),
                    event("response.content_part.added", **where, part=_part(""))]

        def close_message() -> list[str]:
            if msg["index"] is None:
                return []
            where = {"item_id": msg_id, "output_index": msg["index"], "content_index": 0}
            text, msg["index"] = msg["text"], None
            done.append(_message(msg_id, text))
            return [event("response.output_text.done", **where, text=text, logprobs=[]),
                    event("response.content_part.done", **where, part=_part(text)),
                    event("response.output_item.done", output_index=len(done) - 1, item=done[-1])]

        def text_delta(delta: str) -> list[str]:
            evs = open_message() if msg["index"] is None else []
            msg["text"] += delta
            where = {"item_id": msg_id, "output_index": msg["index"], "content_index": 0}
            return [*evs, event("response.output_text.delta", **where, delta=delta, logprobs=[])]

        def call_events(call: dict) -> list[str]:
            evs = close_message()  # text after a call would open a new message: not in the parser's format
            index, item = len(done), _function_call(st.new_id("fc"), call)
            done.append(item)
            return [*evs, event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                                         "status": "in_progress"}),
                    event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"]),
                    event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"]),
                    event("response.output_item.done", output_index=index, item=item)]

        try:
            yield event("response.created", response=response("in_progress"))
            yield event("response.in_progress", response=response("in_progress"))
            if streamer is None:
                for e in open_message():
                    yield e
            while True:
                c = out.outputs[0]
                if streamer is None:
                    if c.delta_text:
                        for e in text_delta(c.delta_text):
                            yield e
                else:
                    for delta in streamer.feed(c.delta_text, final=c.finish_reason is not None):
                        evs = text_delta(delta["content"]) if "content" in delta else \
                            [e for call in delta["tool_calls"] for e in call_events(call)]
                        for e in evs:
                            yield e
                if out.finished:
                    break
                out = await gen.__anext__()
                rec.observe(out)
            st.metrics.observe_finished(out)
            if not done and msg["index"] is None:  # no call and no text: an empty message
                for e in open_message():
                    yield e
            for e in close_message():
                yield e
            status = final_status(out)
            yield event(f"response.{status}", response=response(status, done, out))
        except (KVServeError, StopAsyncIteration) as e:
            err = error_body(status_of(e), str(e) or "stream ended")["error"]
            yield event("error", code=err["code"], message=err["message"], param=None)
        finally:
            await gen.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")
