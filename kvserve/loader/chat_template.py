"""Chat templates rendered with jinja2 the way transformers renders them."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from kvserve.errors import InvalidRequestError


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"invalid chat template: {e}") from None


def render_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    import jinja2

    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError("each chat message needs a 'role' (and usually 'content')")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"chat template failed: {e}") from None
