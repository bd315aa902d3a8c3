"""OpenAI API request bodies (pydantic).

An unknown field is rejected by name, never silently dropped; documented OpenAI fields that change
nothing here are declared and ignored (IGNORED_FIELDS, listed in the README). A null is the field's
default, as OpenAI treats it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"n": null` means n's default; a null for an unknown field is still rejected by name."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, usage on every chunk
    include_obfuscation: bool | None = None  # accepted, ignored: kvserve adds no obfuscation padding


# Fields accepted and ignored: they change nothing about the answer here (README: "Ignored fields").
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                  "parallel_tool_calls", "stream_options.include_obfuscation")


class _Common(_Body):
    model: str | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted, ignored (IGNORED_FIELDS)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # extensions, as vLLM names them
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0  # scheduling priority (--scheduling-policy priority): lower runs first

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        default_max_tokens: int | None = None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream=true")
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise InvalidRequestError("logit_bias keys must be token ids") from None
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            seed=self.seed,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            priority=self.priority,
        )


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise InvalidRequestError(f"message content part of type {p.get('type')!r} is not supported")
            parts.append(p.get("text", ""))
        return "".join(parts)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    parallel_tool_calls: bool | None = None  # accepted, ignored: no tools here (a `tools` field is a 400)

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(f"response_format {self.response_format.type!r} is not supported yet")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(mt, lp, default_max_tokens=default_max_tokens)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported")
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequestError("best_of is not supported")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise InvalidRequestError(f"logprobs must be in [0, 5], got {self.logprobs}")
        prompt_lp = self.logprobs if (self.echo and self.logprobs is not None) else None
        # scoring: one token is generated (the engine's least) and left out of the answer
        max_tokens = 1 if self.score_only else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs, prompt_lp, default_max_tokens=default_max_tokens)

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompt back with its logprobs, nothing generated."""
        return self.max_tokens == 0 and self.echo

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them (content parts joined to text)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    return_token_strs: bool = False

    def token_ids(self, tokenizer: Any) -> list[int]:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("send one of prompt or messages")
        if self.prompt is not None:
            special = True if self.add_special_tokens is None else self.add_special_tokens
            return tokenizer.encode(self.prompt, add_special_tokens=special)
        text = tokenizer.apply_chat_template(chat_dicts(self.messages), add_generation_prompt=self.add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=bool(self.add_special_tokens))


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class ResponsesRequest(_Body):
    """POST /v1/responses: text or message items in, one assistant message out (no tools, no stored state)."""
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None  # only {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    tool_choice: Literal["none", "auto"] | None = None  # there are no tools: either means none
    tools: list[Any] | None = None  # only empty
    include: list[str] | None = None  # only empty
    stream_options: StreamOptions | None = None  # only include_obfuscation here, ignored
    # accepted, ignored (IGNORED_FIELDS)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    # extensions, as for chat
    top_k: int | None = None
    seed: int | None = None

    def messages(self) -> list[dict[str, str]]:
        """The conversation for the chat template: instructions as the system message, then the input items."""
        msgs = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*msgs, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            if item.get("type", "message") != "message":
                raise InvalidRequestError(f"input[{i}]: items of type {item.get('type')!r} are not supported")
            extra = set(item) - {"type", "role", "content", "id", "status"}
            if extra:
                raise InvalidRequestError(f"input[{i}]: unsupported field(s) {', '.join(sorted(extra))}")
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"input[{i}]: role {role!r} is not supported")
            msgs.append({"role": role, "content": _item_text(item.get("content"), i)})
        if not msgs:
            raise InvalidRequestError("input is empty")
        return msgs

    def to_sampling_params(self) -> SamplingParams:
        fmt = (self.text or {}).get("format", {"type": "text"})
        if set(self.text or {}) - {"format"} or fmt.get("type") != "text":
            raise InvalidRequestError(f"text {self.text} is not supported yet (only format text)")
        if self.tools or self.include:
            raise InvalidRequestError(f"{'tools' if self.tools else 'include'} is not supported yet")
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=-1 if self.top_k is None else self.top_k, seed=self.seed,
                              max_tokens=self.max_output_tokens)


def _item_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"input[{i}].content must be a string or a list of parts")
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise InvalidRequestError(f"input[{i}]: content part of type {kind!r} is not supported")
        parts.append(str(p.get("text", "")))
    return "".join(parts)
