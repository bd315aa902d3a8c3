"""langchain-openai unmodified against kvserve's API: structured output in both of its modes, bound
tools, and a conversation carrying a tool call and its result (what agent loops send)."""

from __future__ import annotations

import langchain_openai
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, ConfigDict, Field

from helpers import make_tiny_hf


class Person(BaseModel):
    """A person."""

    model_config = ConfigDict(extra="forbid")  # a closed object: a random-weight model cannot ramble in new keys
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)  # bounded: a random-weight model never closes a free string


@tool(args_schema=WeatherArgs)
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.openai.app import build_app

    path = make_tiny_hf(tmp_path_factory.mktemp("tiny-lc"), "llama", max_position_embeddings=2048)
    engine = AsyncLLMEngine(LLMEngine(model=str(path), kv_cache_memory="8MiB"))
    with TestClient(build_app(engine, "tiny")) as http:
        yield langchain_openai.ChatOpenAI(model="tiny", base_url="http://testserver/v1", api_key="x",
                                          http_client=http, max_retries=0, temperature=0, max_tokens=256)
    engine.shutdown()


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(chat, method):
    got = chat.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(got, Person) and len(got.name) <= 8 and 0 <= got.age <= 120


def test_bind_tools_required_gives_parsed_calls(chat):
    # strict: LangChain then sends additionalProperties false (without it, JSON Schema lets a random-weight
    # model add keys of its own forever)
    msg = chat.bind_tools([get_weather], tool_choice="required", strict=True).invoke("Weather in Paris?")
    assert isinstance(msg, AIMessage) and msg.tool_calls
    for call in msg.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]


def test_conversation_with_a_tool_result(chat):
    bound = chat.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False, strict=True)
    first = bound.invoke("Weather in Paris?")
    (call,) = first.tool_calls
    history = [HumanMessage("Weather in Paris?"), first,
               ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = chat.invoke(history)
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
