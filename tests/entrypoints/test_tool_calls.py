"""Tool calling: tools / tool_choice / parallel_tool_calls on chat completions (tiny random Llama in process,
with room for the tools prompt), the Hermes parser whole and streamed, and the conversation a template gets."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from helpers import make_tiny_hf
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest
from kvserve.entrypoints.openai.tool_parsers import HermesToolParser, get_tool_parser
from kvserve.entrypoints.openai.tools import conversation, plan_tools
from kvserve.errors import InvalidRequestError

MSG = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


@pytest.fixture(scope="module")
def oai(tmp_path_factory):
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.openai.app import build_app

    path = make_tiny_hf(tmp_path_factory.mktemp("tiny-tools"), "llama", max_position_embeddings=2048)
    engine = AsyncLLMEngine(LLMEngine(model=str(path), kv_cache_memory="8MiB"))
    with TestClient(build_app(engine, "tiny")) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    engine.shutdown()


def _valid_calls(calls, names=("get_weather", "add")) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_and_named_always_parse(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required",
                                        max_tokens=200, temperature=1.0, seed=seed)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        _valid_calls(ch.message.tool_calls)
    for parallel in (False, True):
        r = oai.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, max_tokens=120, temperature=1.0,
                                        seed=1, parallel_tool_calls=parallel,
                                        tool_choice={"type": "function", "function": {"name": "add"}})
        (call,) = r.choices[0].message.tool_calls  # named: exactly one call, of that function
        _valid_calls([call], names=("add",))
        assert r.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_is_one_call(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_match_the_whole_answer(oai):
    kw = dict(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0,
              seed=2, n=2)
    whole = oai.chat.completions.create(**kw)
    deltas: dict[int, dict[int, dict]] = {0: {}, 1: {}}
    finish = {}
    for chunk in oai.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                d = deltas[ch.index].setdefault(tc.index, {"name": "", "arguments": ""})
                d["name"] += tc.function.name or ""
                d["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for ch in whole.choices:
        got = [deltas[ch.index][i] for i in sorted(deltas[ch.index])]
        assert got == [{"name": c.function.name, "arguments": c.function.arguments} for c in ch.message.tool_calls]


def test_auto_and_none_answer_in_text(oai):
    for choice in ("auto", "none"):
        r = oai.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=6,
                                        temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None


def test_conversation_with_tool_messages_is_accepted(oai):
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = oai.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, needle", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "'nope', which is not in tools"),
    (dict(tools=None, tool_choice="required"), "needs tools"),
    (dict(tool_choice="required", extra_body={"guided_regex": "a"}), "guided_regex, tool_choice"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "unique"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools.0.function.name"),
    (dict(tool_choice="required", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}]), "nope"),
])
def test_bad_tool_requests_are_400(oai, extra, needle):
    kw = {"model": "tiny", "messages": MSG, "tools": TOOLS, "max_tokens": 4, **extra}
    if kw["tools"] is None:
        del kw["tools"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    assert needle in e.value.message


def test_tool_message_needs_its_call_id(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[*MSG, {"role": "tool", "content": "5"}], max_tokens=4)
    assert "tool_call_id" in e.value.message


# -- the parser and the conversation, without a model ------------------------------------------------

HERMES_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
               '</tool_call>\n<tool_call>{"name": "unknown", "arguments": {}}</tool_call>\n'
               '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>')


def test_hermes_extract():
    p = get_tool_parser("hermes")
    content, calls = p.extract(HERMES_TEXT, {"get_weather", "add"})
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "C"}),
                                                                 ("add", {"a": 1, "b": 2})]
    assert content.startswith("Let me check.") and "unknown" in content  # not a call: stays text
    assert p.extract("no calls here", {"add"}) == ("no calls here", [])
    _, calls = p.extract('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}', {"add"})  # never closed
    assert len(calls) == 1
    with pytest.raises(InvalidRequestError, match="unknown tool call parser"):
        get_tool_parser("nope")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_streaming_equals_whole(step):
    p = HermesToolParser()
    names = {"get_weather", "add"}
    _, whole = p.extract(HERMES_TEXT, names)
    s = p.streamer(names)
    deltas = []
    for i in range(0, len(HERMES_TEXT), step):
        deltas += s.feed(HERMES_TEXT[i:i + step])
    deltas += s.feed("", final=True)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    text = "".join(d.get("content", "") for d in deltas)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [(c.name, c.arguments)
                                                                                      for c in whole]
    assert [c["index"] for c in calls] == [0, 1]
    assert text.startswith("Let me check. ") and "<tool_call>" in text and "unknown" in text  # only the bad block
    assert "get_weather" not in text


def test_hermes_grammar_accepts_its_own_calls(tmp_path):
    """Every sentence of the required grammar parses back to the calls that produced it (and only those)."""
    from kvserve.loader import load_model
    from kvserve.sampling_params import StructuredOutputsParams
    from kvserve.structured import GrammarBackend

    lm = load_model(make_tiny_hf(tmp_path, "llama"))
    backend = GrammarBackend(lm.tokenizer, lm.config.vocab_size)
    p = HermesToolParser()
    text = p.render_call("add", '{"a": 4, "b": 5}') + "\n" + p.render_call("get_weather", {"city": "Rome", "unit": "F"})
    for parallel, ok in ((True, True), (False, False)):
        m = backend.compile(StructuredOutputsParams(grammar=p.grammar(TOOLS, parallel))).matcher()
        ids = lm.tokenizer.encode(text, add_special_tokens=False)
        accepted = all(m.accept(t) for t in ids) and m.is_accepting
        assert accepted == ok
    m = backend.compile(StructuredOutputsParams(grammar=p.grammar(TOOLS, True))).matcher()
    bad = p.render_call("add", '{"a": 400, "b": 5}')  # out of the schema's bounds
    assert not all(m.accept(t) for t in lm.tokenizer.encode(bad, add_special_tokens=False))


def _body(**kw) -> ChatCompletionRequest:
    history = [{"role": "system", "content": "Be brief."}, *MSG,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    return ChatCompletionRequest(messages=history, tools=TOOLS, **kw)


def test_conversation_without_a_tools_template():
    body = _body()
    msgs, extra = conversation(body, plan_tools(body), "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert extra == {} and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert msgs[3]["content"] == "<tool_response>\n5\n</tool_response>"
    none = _body(tool_choice="none")  # tools not offered, but the history still reads as a conversation
    msgs, _ = conversation(none, plan_tools(none), "")
    assert msgs[0]["content"] == "Be brief." and "<tool_call>" in msgs[2]["content"]


def test_conversation_with_a_tools_template():
    body = _body()
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}{% for m in messages %}{{ m.role }}{% endfor %}"
    msgs, extra = conversation(body, plan_tools(body), template)
    assert extra == {"tools": TOOLS} and [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}  # objects, as HF templates expect
    assert msgs[3]["tool_call_id"] == "c1"


# -- /v1/responses: the same tools, flat as that API writes them -------------------------------------------

RESP_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
QUESTION = MSG[0]["content"]


def _resp_calls(r):
    calls = [o for o in r.output if o.type == "function_call"]
    for c in calls:
        assert c.id.startswith("fc") and c.call_id.startswith("call_") and c.status == "completed"
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    return calls


def test_responses_required_and_named_calls_equal_chat(oai):
    """The same prompt, grammar and draws as chat completions: with a seed, the same calls."""
    for seed in range(2):
        r = oai.responses.create(model="tiny", input=QUESTION, tools=RESP_TOOLS, tool_choice="required",
                                 max_output_tokens=200, temperature=1.0, extra_body={"seed": seed})
        chat = oai.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=seed).choices[0].message.tool_calls
        calls = _resp_calls(r)
        assert r.status == "completed" and calls and all(o.type == "function_call" for o in r.output)
        assert [(c.name, c.arguments) for c in calls] == [(c.function.name, c.function.arguments) for c in chat]
        assert r.tool_choice == "required" and [t.name for t in r.tools] == ["get_weather", "add"]
    r = oai.responses.create(model="tiny", input=QUESTION, tools=RESP_TOOLS, max_output_tokens=200,
                             tool_choice={"type": "function", "name": "add"}, temperature=1.0, extra_body={"seed": 5})
    (call,) = _resp_calls(r)
    assert call.name == "add" and len(r.output) == 1


def test_responses_streamed_calls_equal_whole(oai):
    kw = dict(model="tiny", input=QUESTION, tools=RESP_TOOLS, tool_choice="required", max_output_tokens=200,
              temperature=1.0, extra_body={"seed": 1})
    whole = oai.responses.create(**kw)
    events = list(oai.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    n = len(whole.output)
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:-1] == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"] * n
    final = events[-1].response
    assert [(o.name, o.arguments) for o in final.output] == [(o.name, o.arguments) for o in whole.output]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(o.name, o.arguments, o.call_id) for o in done] == [(o.name, o.arguments, o.call_id) for o in final.output]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_call_items_render_as_chat_tool_messages(oai):
    """A function_call item and its function_call_output give the prompt chat's tool messages give:
    the same seed then answers the same text."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    chat = oai.chat.completions.create(model="tiny", tools=TOOLS, tool_choice="none", max_tokens=12, temperature=1.0,
                                       seed=3, messages=[*MSG, {"role": "assistant", "content": None,
                                                                "tool_calls": [call]},
                                                         {"role": "tool", "tool_call_id": "call_1", "content": "5"}])
    r = oai.responses.create(model="tiny", tools=RESP_TOOLS, tool_choice="none", max_output_tokens=12,
                             temperature=1.0, extra_body={"seed": 3}, input=[
                                 {"role": "user", "content": QUESTION},
                                 {"type": "function_call", "call_id": "call_1", "name": "add",
                                  "arguments": '{"a": 2, "b": 3}'},
                                 {"type": "function_call_output", "call_id": "call_1", "output": "5"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_auto_stream_equals_whole(oai):
    """tool_choice auto: the model may answer in text (random weights mostly do); streamed items match the
    whole response item for item."""
    kw = dict(model="tiny", input=QUESTION, tools=RESP_TOOLS, max_output_tokens=40, temperature=1.0,
              extra_body={"seed": 2})
    whole = oai.responses.create(**kw)
    events = list(oai.responses.create(stream=True, **kw))
    final = events[-1].response
    assert [o.type for o in final.output] == [o.type for o in whole.output] and final.output_text == whole.output_text
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == list(range(len(whole.output)))
