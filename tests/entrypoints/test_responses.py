"""/v1/responses through the official client: text or message items, instructions, max_output_tokens, streaming."""

from __future__ import annotations

import openai
import pytest

from conftest import TINY_NAME

SYSTEM = "Answer briefly."


def _chat_text(oai, max_tokens: int) -> str:
    r = oai.chat.completions.create(model=TINY_NAME, max_tokens=max_tokens, temperature=0, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])
    return r.choices[0].message.content


def test_create_matches_chat(oai):
    r = oai.responses.create(model=TINY_NAME, input="hi", instructions=SYSTEM, max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.id.startswith("resp") and r.model == TINY_NAME
    assert r.output_text == _chat_text(oai, 6)
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert 0 < r.usage.output_tokens <= 6 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.usage.output_tokens == 6:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    items = oai.responses.create(model=TINY_NAME, max_output_tokens=6, temperature=0, input=[
        {"role": "system", "content": SYSTEM},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    assert items.output_text == r.output_text and items.usage.input_tokens == r.usage.input_tokens


def test_stream_events(oai):
    whole = oai.responses.create(model=TINY_NAME, input="hi", instructions=SYSTEM, max_output_tokens=8,
                                 temperature=0)
    events = list(oai.responses.create(model=TINY_NAME, input="hi", instructions=SYSTEM, max_output_tokens=8,
                                       temperature=0, stream=True, stream_options={"include_obfuscation": False},
                                       include=[], tools=[], store=False, metadata={"a": "b"}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("kw, needle", [
    (dict(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "call_id"),
    (dict(input="hi", tools=[{"type": "web_search"}]), "tools"),
    (dict(input="hi", tool_choice="required"), "needs tools"),
    (dict(input="hi", previous_response_id="resp_1"), "previous_response_id"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input_image"),
    (dict(input="hi", text={"format": {"type": "json_object"}}), "json_object"),
])
def test_unsupported_is_400(oai, kw, needle):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=TINY_NAME, max_output_tokens=4, **kw)
    assert needle in e.value.message


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="gpt-5", input="hi")


def test_async_client_and_raw_response(tiny_app, oai):
    import asyncio

    import httpx

    raw = oai.responses.with_raw_response.create(model=TINY_NAME, input="hi", max_output_tokens=4, temperature=0)
    assert raw.http_response.status_code == 200 and raw.headers["content-type"] == "application/json"
    sync = raw.parse()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=tiny_app), base_url="http://t") as h:
            ac = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=h, max_retries=0)
            whole = await ac.responses.create(model=TINY_NAME, input="hi", max_output_tokens=4, temperature=0)
            stream = await ac.responses.create(model=TINY_NAME, input="hi", max_output_tokens=4, temperature=0,
                                               stream=True)
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            return whole, "".join(deltas)

    whole, streamed = asyncio.run(main())
    assert whole.output_text == streamed == sync.output_text
