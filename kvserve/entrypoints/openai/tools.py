"""Tool calling for chat completions and responses: the conversation a template renders, the constraint that
tool_choice demands, and the answer's calls found in the model's text (through a ToolParser).

A template with a tools section (it reads `tools`) gets the tools and the OpenAI-shaped messages
(arguments as objects, as transformers' templates expect); any other template gets the parser's
default system prompt listing the tools, earlier calls written in the parser's format inside the
assistant's text, and tool results as user messages wrapped as the parser wraps them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, ResponsesRequest, chat_dicts
from kvserve.entrypoints.openai.tool_parsers import ToolCallStreamer, ToolParser, get_tool_parser
from kvserve.entrypoints.openai.tool_parsers.base import ToolCall
from kvserve.sampling_params import StructuredOutputsParams


@dataclass
class ToolPlan:
    """What a chat request's tools mean for its prompt, its constraint and its answer."""

    mode: str  # none | auto | required | a function name
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function dicts
    parallel: bool = True
    parser: ToolParser | None = None

    @property
    def parses(self) -> bool:
        return self.mode != "none" and self.parser is not None

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def constraint(self) -> StructuredOutputsParams | None:
        """required: one or more calls of any tool; a named function: one call of it; else None."""
        if self.parser is None or self.mode in ("none", "auto"):
            return None
        if self.mode == "required":
            return StructuredOutputsParams(grammar=self.parser.grammar(self.tools, self.parallel))
        named = [t for t in self.tools if t["function"]["name"] == self.mode]
        return StructuredOutputsParams(grammar=self.parser.grammar(named, parallel=False))

    def answer(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(the assistant message, the finish reason) of one choice's whole text."""
        if not self.parses:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = self.parser.extract(text, self.names)
        calls = self._allowed(calls)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        if self.mode != "auto":
            content = None  # the grammar leaves no room for text besides the calls
        return ({"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]},
                "tool_calls")

    def streamer(self) -> ToolCallStreamer | None:
        return self.parser.streamer(self.names, self.parallel) if self.parses else None

    def _allowed(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.parallel else calls[:1]


def plan_tools(body: ChatCompletionRequest, parser_name: str = "hermes") -> ToolPlan:
    mode = body.tool_mode()
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    parser = get_tool_parser(parser_name) if tools or any(m.tool_calls or m.role == "tool" for m in body.messages) \
        else None
    return ToolPlan(mode, tools, body.parallel_tool_calls is not False, parser)


def plan_response_tools(body: ResponsesRequest, messages: list[dict[str, Any]],
                        parser_name: str = "hermes") -> ToolPlan:
    """The tool plan of a /v1/responses request (its tools flat, as that API writes them)."""
    mode = body.tool_mode()
    tools = body.chat_tools()
    used = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    parser = get_tool_parser(parser_name) if tools or used else None
    return ToolPlan(mode, tools, body.parallel_tool_calls is not False, parser)


def conversation(body: ChatCompletionRequest | list[dict[str, Any]], plan: ToolPlan,
                 template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the messages, extra template variables) for the chat template; `body` a chat request or its
    messages as chat dicts (the Responses API's items, converted)."""
    messages = body if isinstance(body, list) else chat_dicts(body.messages)
    offered = plan.tools if plan.mode != "none" else []
    if plan.parser is None:
        return messages, {}
    template = template or ""
    if "tools" in template:  # the template renders tools and calls itself
        for m in messages:
            for c in m.get("tool_calls", ()):
                try:
                    c["function"]["arguments"] = json.loads(c["function"]["arguments"])
                except ValueError:
                    pass  # left as text: the template prints what it got
        return messages, ({"tools": offered} if offered else {})
    p = plan.parser
    knows_tool_role = "'tool'" in template or '"tool"' in template
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(p.render_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m['content']}\n{calls}" if m["content"] else calls})
        elif m["role"] == "tool":
            out.append({"role": "tool" if knows_tool_role else "user", "content": p.render_result(m["content"])})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if offered:
        prompt = p.system_prompt(offered)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}
