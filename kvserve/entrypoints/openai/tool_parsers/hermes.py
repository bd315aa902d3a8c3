"""Hermes tool calls (NousResearch Hermes 2 Pro, also Qwen2.5's template):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tools announced in the system prompt inside <tools></tools>, results given back in <tool_response></tool_response>.
"""

from __future__ import annotations

import json
from typing import Any

from kvserve.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, arguments_text
from kvserve.structured.backend import JSON_OPTIONS

SYSTEM_PROMPT = """You can call functions to answer the user. The functions, as JSON schemas, are:
<tools>
{tools}
</tools>
To call functions, answer with one block per call, each holding a JSON object with the function's name and arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments>}}}}
</tool_call>"""


class HermesToolParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))

    def render_call(self, name: str, arguments: Any) -> str:
        args = json.loads(arguments_text(arguments) or "{}")
        return f"{self.start}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{self.end}"

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        rules = []
        for i, t in enumerate(tools):
            fn = t["function"]
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
            rules.append(f"fn{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        alts = " | ".join(f"fn{i}" for i in range(len(tools)))
        call = f'call: {json.dumps(self.start + chr(10))} ({alts}) {json.dumps(chr(10) + self.end)}'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return "\n".join([start, call, *rules])

    def parse_call(self, body: str, names: set[str]) -> ToolCall | None:
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = arguments_text(obj.get("arguments", obj.get("parameters", {})))
        return ToolCall(obj["name"], args) if args is not None else None
