"""OpenAI API request bodies (pydantic).

An unknown field is rejected by name, never silently dropped; documented OpenAI fields that change
nothing here are declared and ignored (IGNORED_FIELDS, listed in the README). A null is the field's
default, as OpenAI treats it. Every field is bounded (the bounds that need the served model are in
limits.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams


MAX_N = 32  # samples per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 16  # stop strings, each at most MAX_STOP_LEN characters
MAX_STOP_LEN = 256
MAX_LOGIT_BIAS = 300  # entries, each in [-100, 100] (OpenAI's bounds)
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 2048
MAX_METADATA = 16  # OpenAI's: at most 16 pairs, keys up to 64 characters, values up to 512
MAX_TOKEN_IDS = 2**20  # token ids in one /detokenize request (the body limit bounds them too)
MAX_TEXT_CHARS = 2**20  # a /tokenize prompt, /v1/responses instructions (a prompt for the engine: max_model_len)
MAX_CHOICES = 1024  # strings of a choice constraint
MAX_GRAMMAR_CHARS = 2**18  # a regex or grammar (a JSON schema is bounded by the body and its depth)
INT64 = 2**63
StopStr = Annotated[str, Field(max_length=MAX_STOP_LEN)]
ShortStr = Annotated[str, Field(max_length=256)]
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=MAX_METADATA)]


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
                  "stream_options.include_obfuscation")


class _Ignored(_Body):
    """Fields OpenAI documents that change nothing here: accepted and ignored (IGNORED_FIELDS)."""

    user: ShortStr | None = None
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: ShortStr | None = None
    prompt_cache_key: ShortStr | None = None
    safety_identifier: ShortStr | None = None


GrammarStr = Annotated[str, Field(max_length=MAX_GRAMMAR_CHARS)]
ChoiceList = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_LEN * 4)]], Field(max_length=MAX_CHOICES)]


class StructuredOutputsBody(_Body):
    """vLLM's `structured_outputs`: exactly one constraint (the names of StructuredOutputsParams)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: GrammarStr | None = None
    choice: ChoiceList | None = None
    grammar: GrammarStr | None = None
    json_object: bool | None = None


class _Common(_Ignored):
    model: ShortStr | None = None
    n: int = Field(1, le=MAX_N)  # the lower bound is SamplingParams' (its message names it)
    stop: StopStr | list[StopStr] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions, as vLLM names them
    top_k: int | None = Field(None, ge=-1, lt=2**31)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, lt=2**31)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=-(2**31), lt=2**31)  # scheduling priority (--scheduling-policy priority): lower runs first
    # structured outputs, as vLLM names them (and its older guided_* fields)
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: GrammarStr | None = None
    guided_choice: ChoiceList | None = None
    guided_grammar: GrammarStr | None = None

    def structured(self, extra: dict[str, StructuredOutputsParams] | None = None) -> StructuredOutputsParams | None:
        """The one output constraint of this request (or None); `extra`: other sources by field name."""
        found: dict[str, StructuredOutputsParams] = dict(extra or {})
        if self.structured_outputs is not None:
            so = self.structured_outputs
            found["structured_outputs"] = StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice,
                                                                  grammar=so.grammar, json_object=so.json_object)
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                found[name] = StructuredOutputsParams(**{kind: getattr(self, name)})
        if len(found) > 1:
            raise InvalidRequestError(f"give one output constraint, got {', '.join(sorted(found))}")
        return next(iter(found.values()), None)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        default_max_tokens: int | None = None,
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
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
            structured_outputs=structured,
        )


MAX_TOOLS = 128
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCallIn(_Body):
    name: FunctionName
    arguments: str = Field("{}", max_length=MAX_TEXT_CHARS)


class ToolCallIn(_Body):
    """An assistant message's earlier call, as OpenAI (and LangChain) send it back in the conversation."""
    id: ShortStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # the bound is on the parts (a Field max_length here would cap a string's characters); text: check_prompt
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)] | None = None
    name: ShortStr | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)  # assistant
    tool_call_id: ShortStr | None = None  # tool

    @model_validator(mode="after")
    def _roles(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequestError(f"tool_calls is only allowed on assistant messages, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequestError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise InvalidRequestError(f"message content part of type {p.get('type')!r} is not supported")
            parts.append(p.get("text", ""))
        return "".join(parts)


class FunctionDef(_Body):
    name: FunctionName
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # changes nothing: required and named calls always follow the schema


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    """OpenAI's response_format.json_schema. `strict` changes nothing here: the schema is always enforced."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = Field(None, max_length=MAX_STOP_LEN * 16)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None:
            raise InvalidRequestError("response_format json_schema needs a json_schema object (name, schema)")
        schema = self.json_schema.schema_
        # OpenAI: no schema means any JSON object
        return StructuredOutputsParams(json=schema) if schema is not None else StructuredOutputsParams(json_object=True)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, lt=2**31)
    max_completion_tokens: int | None = Field(None, lt=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool | None = None  # default true: several calls in one answer

    def tool_mode(self) -> str:
        """none, auto, required, or the named function's name; raises on a choice the tools cannot meet."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tools: function names must be unique")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, which is not in tools"
                                          f" ({', '.join(names) or 'none given'})")
            return choice.function.name
        if choice in ("auto", "required") and not names:
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools")
        return choice

    def to_sampling_params(self, default_max_tokens: int | None,
                           tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        """tool_constraint: the grammar of the calls that tool_choice required / a named function demands."""
        sources = {}
        if self.response_format is not None and (fmt := self.response_format.constraint()) is not None:
            sources["response_format"] = fmt
        if tool_constraint is not None:
            sources["tool_choice"] = tool_constraint
        structured = self.structured(sources)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(mt, lp, default_max_tokens=default_max_tokens, structured=structured)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, lt=2**31)
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
        return self.sampling_params(max_tokens, self.logprobs, prompt_lp, default_max_tokens=default_max_tokens,
                                    structured=self.structured())

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
        if len(p) > MAX_PROMPTS:
            raise InvalidRequestError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(p)}")
        return list(p)  # type: ignore[arg-type]


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them (content parts joined to text; tool fields kept)."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            d["name"] = m.name
        out.append(d)
    return out


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered through the chat template. As vLLM, the count
    is not held to max_model_len (that is what a client asks /tokenize about); the text is bounded instead."""
    model: ShortStr | None = None
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
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
    model: ShortStr | None = None
    tokens: list[int] = Field(max_length=MAX_TOKEN_IDS)


class ResponsesFunctionTool(FunctionDef):
    """A Responses API function tool: the chat API's function fields, flat."""
    type: Literal["function"]


class ResponsesNamedToolChoice(_Body):
    type: Literal["function"]
    name: FunctionName


class ResponsesRequest(_Ignored):
    """POST /v1/responses: text, message and function-call items in; an assistant message and/or function
    calls out (no stored state)."""
    model: ShortStr | None = None
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]  # the prompt: limits.check_prompt
    instructions: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    max_output_tokens: int | None = Field(None, lt=2**31)  # against max_model_len: limits.check_request
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None  # only {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedToolChoice | None = None
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    include: list[ShortStr] | None = Field(None, max_length=MAX_STOP)  # only empty
    stream_options: StreamOptions | None = None  # only include_obfuscation here, ignored
    parallel_tool_calls: bool | None = None
    # extensions, as for chat
    top_k: int | None = Field(None, ge=-1, lt=2**31)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages: instructions as the system message, then the input items (a
        function_call joins the assistant message before it as a tool call, a function_call_output is a
        tool message)."""
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*msgs, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "function_call":  # several calls of one turn come as consecutive items
                call = _call_item(item, i)
                if msgs and msgs[-1]["role"] == "assistant":
                    msgs[-1].setdefault("tool_calls", []).append(call)
                else:
                    msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
                continue
            if kind == "function_call_output":
                msgs.append(_call_item(item, i))
                continue
            if kind != "message":
                raise InvalidRequestError(f"input[{i}]: items of type {kind!r} are not supported")
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

    def to_sampling_params(self, tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        """tool_constraint: the grammar of the calls that tool_choice required / a named function demands."""
        fmt = (self.text or {}).get("format", {"type": "text"})
        if set(self.text or {}) - {"format"} or fmt.get("type") != "text":
            raise InvalidRequestError(f"text {self.text} is not supported yet (only format text)")
        if self.include:
            raise InvalidRequestError("include is not supported yet")
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=-1 if self.top_k is None else self.top_k, seed=self.seed,
                              max_tokens=self.max_output_tokens,
                              structured_outputs=tool_constraint)

    def chat_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat API's function dicts (what the tool plan and templates take)."""
        return [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                for t in self.tools or []]

    def tool_mode(self) -> str:
        """none, auto, required, or the named function's name; raises on a choice the tools cannot meet."""
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tools: function names must be unique")
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if names else "none")
        if isinstance(choice, ResponsesNamedToolChoice):
            if choice.name not in names:
                raise InvalidRequestError(f"tool_choice names function {choice.name!r}, which is not in tools"
                                          f" ({', '.join(names) or 'none given'})")
            return choice.name
        if choice in ("auto", "required") and not names:
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools")
        return choice


def _call_item(item: dict[str, Any], i: int) -> dict[str, Any]:
    """A function_call input item as a chat tool call; a function_call_output as a tool message."""
    kind = item["type"]
    fields = {"function_call": {"call_id", "name", "arguments"}, "function_call_output": {"call_id", "output"}}[kind]
    missing = sorted(f for f in fields if not isinstance(item.get(f), str))
    if missing:
        raise InvalidRequestError(f"input[{i}]: a {kind} item needs string field(s) {', '.join(missing)}")
    extra = set(item) - fields - {"type", "id", "status"}
    if extra:
        raise InvalidRequestError(f"input[{i}]: unsupported field(s) {', '.join(sorted(extra))}")
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}


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
