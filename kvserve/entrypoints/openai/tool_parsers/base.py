"""The ToolParser interface, and streaming of tagged tool calls shared by every tag-delimited format."""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolParser(ABC):
    """One tool-call convention. Calls are delimited by `start` ... `end` tags around a JSON body."""

    name: str
    start: str
    end: str

    @abstractmethod
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """The system text that announces `tools` (OpenAI function dicts) to a template without a tools section."""

    @abstractmethod
    def render_call(self, name: str, arguments: Any) -> str:
        """An earlier call of the assistant, as the model would have written it."""

    @abstractmethod
    def render_result(self, content: str) -> str:
        """A tool's result, as a message for a template that has no `tool` role."""

    @abstractmethod
    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A grammar (llguidance Lark) whose every sentence is one call (or several, `parallel`) of `tools`,
        the arguments under each function's parameter schema: output generated under it always parses."""

    @abstractmethod
    def parse_call(self, body: str, names: set[str]) -> ToolCall | None:
        """The call in one tagged block's body, or None if it is not a call of a known tool."""

    def extract(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        """(the content outside the calls or None, the calls) of a whole output. An unclosed last block
        (the model ended without the end tag) still counts when its body is a whole call."""
        calls, content, pos = [], [], 0
        while True:
            i = text.find(self.start, pos)
            if i < 0:
                content.append(text[pos:])
                break
            j = text.find(self.end, i + len(self.start))
            body = text[i + len(self.start): j if j >= 0 else len(text)]
            call = self.parse_call(body, names)
            if call is None:
                content.append(text[pos: j + len(self.end) if j >= 0 else len(text)])
            else:
                content.append(text[pos:i])
                calls.append(call)
            if j < 0:
                break
            pos = j + len(self.end)
        rest = "".join(content).strip()
        return (rest or None), calls

    def streamer(self, names: set[str], parallel: bool = True) -> ToolCallStreamer:
        return ToolCallStreamer(self, names, parallel)


class ToolCallStreamer:
    """Turns one choice's text deltas into chat deltas: content until a call's start tag, then one
    tool_calls delta per completed call (its id, name and whole arguments). Text that may be the
    beginning of a start tag is held back until it is known not to be."""

    def __init__(self, parser: ToolParser, names: set[str], parallel: bool) -> None:
        self.parser = parser
        self.names = names
        self.parallel = parallel
        self.buffer = ""
        self.in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool = False) -> list[dict[str, Any]]:
        """The chat `delta` objects for this much more text (final: the output has ended)."""
        out: list[dict[str, Any]] = []
        self.buffer += delta
        p = self.parser
        while self.buffer:
            if not self.in_call:
                i = self.buffer.find(p.start)
                if i < 0:
                    keep = 0 if final else _partial_suffix(self.buffer, p.start)
                    text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    if text and not (self.calls and not text.strip()):
                        out.append({"content": text})
                    break
                if i > 0 and (not self.calls or self.buffer[:i].strip()):
                    out.append({"content": self.buffer[:i]})
                self.buffer, self.in_call = self.buffer[i:], True
            j = self.buffer.find(p.end)
            if j < 0 and not final:
                break
            block = self.buffer[: j + len(p.end)] if j >= 0 else self.buffer
            self.buffer = self.buffer[len(block):]
            self.in_call = False
            call = p.parse_call(block[len(p.start): len(block) - (len(p.end) if j >= 0 else 0)], self.names)
            if call is None:
                out.append({"content": block})
            elif self.parallel or not self.calls:
                out.append({"tool_calls": [{"index": len(self.calls), "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": call.arguments}}]})
                self.calls.append(call)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def arguments_text(arguments: Any) -> str | None:
    """A call's arguments as JSON object text (they may come as an object or as its text); None if not an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)
