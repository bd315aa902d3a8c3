"""What the engine hands back: one RequestOutput per request (n samples inside)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.engine.request import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""  # text new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0
    queue_time: float = 0.0  # seconds spent waiting: before first scheduled and after each preemption
    num_output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def normalized_latency(self) -> float | None:
        """End-to-end seconds per output token."""
        e2e = self.e2e
        return None if e2e is None or self.num_output_tokens == 0 else e2e / self.num_output_tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprob | None] | None = None
