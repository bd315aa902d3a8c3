"""Request: one sequence being generated, and its place in the scheduler's life cycle."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.engine.detokenizer import IncrementalDetokenizer
    from kvserve.structured.matcher import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; recomputed from scratch when resumed
    SWAPPED = "swapped"  # blocks copied to the host pool; copied back when resumed
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


class Request:
    """Token ids (prompt + generated), how many have K/V in the cache, and bookkeeping.

    The scheduler's one rule: catch `num_computed_tokens` up with `num_tokens`. A prefill, a
    chunk of one, a decode and a recompute after preemption are all the same thing.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        max_model_len: int,
        arrival_time: float | None = None,
        group_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.group_id = group_id or request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_token_ids = set(params.stop_token_ids)
        total = max_model_len if params.max_tokens is None else len(prompt_token_ids) + params.max_tokens
        self.max_total_tokens = min(total, max_model_len)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.num_swaps = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # A sibling of an n>1 group waits until its first sibling's prompt is cached, then shares it.
        self.wait_for: Request | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.logprobs: list[Logprob] = []
        # text so far and stop strings; None where there is no tokenizer (the simulator)
        self.detokenizer: IncrementalDetokenizer | None = None
        self._stop_str: str | None = None  # the stop string the last token completed
        # the structured-output constraint's state (params.structured_outputs), advanced by the post-step update
        self.grammar: GrammarMatcher | None = None
        self.draft_record = None  # speculative decoding: its drafts' acceptance record (spec_decode/adaptive.py)
        self.rng_states: list[torch.Tensor] = []  # a seeded verify step: its generator after each position's draw
        self.prompt_logprobs: list[Logprob | None] = []
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache
        # scheduling policy state: static priority (lower first), the lpf prediction, aging
        self.priority = params.priority
        self.predicted_output_tokens: float | None = None
        self.aged = False
        # waiting-time bookkeeping: closed intervals summed in queue_time; the open one starts at
        # queued_since (None while running or finished)
        self.queue_time = 0.0
        self.queued_since: float | None = self.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def waited(self, now: float) -> float:
        """Total seconds spent in the waiting queue so far (first admission and after preemptions)."""
        return self.queue_time + (now - self.queued_since if self.queued_since is not None else 0.0)

    def append_token(self, token_id: int, logprob: Logprob | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.detokenizer is not None:
            self._stop_str = self.detokenizer.add(token_id)

    def check_stop(self) -> str | None:
        """Finish reason after the last appended token: a stop string it completed, EOS or a stop
        id (once min_tokens are out), or the length limit; None to go on."""
        n_out = len(self.output_token_ids)
        if n_out == 0:
            return None
        if self._stop_str is not None:
            self.stop_reason = self._stop_str
            return "stop"
        last = self.output_token_ids[-1]
        if n_out >= self.params.min_tokens:
            if last in self.eos_token_ids:
                return "stop"
            if last in self.stop_token_ids:
                self.stop_reason = last
                return "stop"
        if self.num_tokens >= self.max_total_tokens:
            return "length"
        return None
