"""OpenAI API request bodies (pydantic). Unknown fields are rejected by name, never ignored; every
field is bounded (the bounds that need the served model are in limits.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams


MAX_N = 32  # samples per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 16  # stop strings, each at most MAX_STOP_LEN characters
MAX_STOP_LEN = 256
MAX_LOGIT_BIAS = 300  # entries, each in [-100, 100] (OpenAI's bounds)
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 2048
INT64 = 2**63
StopStr = Annotated[str, Field(max_length=MAX_STOP_LEN)]
ShortStr = Annotated[str, Field(max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    user: ShortStr | None = None  # accepted, ignored
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    name: ShortStr | None = None

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
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, lt=2**31)
    max_completion_tokens: int | None = Field(None, lt=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

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
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_lp, default_max_tokens=default_max_tokens)

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
