"""Tool-call formats: how tools are announced to a model, how its calls are written, found and streamed.

A ToolParser names one convention (Hermes `<tool_call>{json}</tool_call>` is the default); register
another with `register_tool_parser` and pick it by name (`get_tool_parser`).
"""

from kvserve.entrypoints.openai.tool_parsers.base import ToolCall, ToolCallStreamer, ToolParser
from kvserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from kvserve.errors import InvalidRequestError

_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    """Make a ToolParser subclass available under its `name` (usable as a class decorator)."""
    _PARSERS[cls.name] = cls
    return cls


def get_tool_parser(name: str = "hermes") -> ToolParser:
    if name not in _PARSERS:
        raise InvalidRequestError(f"unknown tool call parser {name!r} (known: {', '.join(sorted(_PARSERS))})")
    return _PARSERS[name]()


register_tool_parser(HermesToolParser)

__all__ = ["HermesToolParser", "ToolCall", "ToolCallStreamer", "ToolParser", "get_tool_parser",
           "register_tool_parser"]
