"""SamplingParams: per-request generation settings, validated on construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kvserve.errors import InvalidRequestError

_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
    "ignore_eos", "logprobs", "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output", "priority",
    "structured_outputs",
)


@dataclass
class StructuredOutputsParams:
    """One constraint on the output, as vLLM names them; exactly one field is set.

    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object; regex: the
    whole output matches it (Rust `regex` syntax); choice: exactly one of these strings;
    grammar: a context-free grammar in llguidance's Lark syntax (GBNF, as llama.cpp writes it,
    is converted). Compiled and checked when the request is added (kvserve/structured/).
    """

    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise InvalidRequestError("structured outputs: give exactly one of json, regex, choice, grammar, "
                                      f"json_object (got {', '.join(set_) if set_ else 'none'})")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(f"structured outputs: the JSON schema is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidRequestError("structured outputs: json must be a JSON schema (an object or its text)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured outputs: {name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidRequestError("structured outputs: choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint: json, json_object, regex, choice or grammar."""
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached by (a schema's key order is kept: it is the output's)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json" and isinstance(self.json, str):
            return kind, self.json
        if kind in ("json", "choice"):
            return kind, json.dumps(value, ensure_ascii=False)
        return kind, "" if kind == "json_object" else value


class SamplingParams:
    """Familiar vLLM/OpenAI names. temperature 0 means greedy; top_k -1 (or 0) means off."""

    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        seed: int | None = None,
        max_tokens: int | None = 16,
        min_tokens: int = 0,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        priority: int = 0,
        structured_outputs: StructuredOutputsParams | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        self.n = n
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k) if top_k is not None else -1
        self.min_p = float(min_p)
        self.repetition_penalty = float(repetition_penalty)
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.logit_bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
        self.seed = seed
        self.max_tokens = max_tokens
        self.min_tokens = int(min_tokens)
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop_token_ids = [int(t) for t in (stop_token_ids or [])]
        self.ignore_eos = bool(ignore_eos)
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        self.priority = priority  # scheduling priority (policy "priority"): lower runs first
        self.structured_outputs = structured_outputs  # a constraint on the output (kvserve/structured/)
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be >= 1, got {self.n}")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                bad(f"{name} must be a finite number, got {getattr(self, name)}")
        if not all(math.isfinite(v) for v in self.logit_bias.values()):
            bad("logit_bias values must be finite numbers")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k < 2**31:
            bad(f"top_k must be -1 (off) or in [0, 2**31), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or v > 20):
                bad(f"{name} must be an integer in [0, 20], got {v}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            bad(f"priority must be an integer, got {self.priority!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs must be a StructuredOutputsParams")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes: Any) -> "SamplingParams":
        values = {f: getattr(self, f) for f in _FIELDS}
        values.update(changes)
        return SamplingParams(**values)

    def __repr__(self) -> str:
        return "SamplingParams(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS) + ")"
