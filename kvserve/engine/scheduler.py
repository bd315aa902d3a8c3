"""Token-budget scheduler: no prefill phase, no decode phase.

Every step, running requests (decodes and unfinished prefill chunks) are served first, in
order, then waiting ones; each gets the tokens it needs to catch `num_computed_tokens` up
with `num_tokens`, cut to the remaining budget (`max_num_batched_tokens`). A long prompt
therefore runs in chunks beside everyone else's decodes. When blocks run out, the most
recently admitted running request is preempted: its blocks are freed and it is recomputed
later, or (preemption_mode swap/auto) its blocks are copied to a host pool and back.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at num_computed_tokens
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True if this step reaches the end of the request's tokens, so its last logits give a new token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    """Everything the model runner needs for one step, and nothing else."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    total_num_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    # Block copies to run before the forward, in this order: out first (the device blocks it
    # reads may be handed to someone else in this very step), then in.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.blocks_to_swap_out and not self.blocks_to_swap_in


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    preemption_mode: str = "recompute"  # recompute | swap | auto
    # auto: swap a victim with at least this many computed tokens, recompute shorter ones
    swap_min_tokens: int = 256


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swaps = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self.requests[req.request_id] = req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Finish (or abort) a request anywhere in its life; frees its blocks."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = time.time()
        self.requests.pop(req.request_id, None)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        victim.num_preemptions += 1
        self.num_preemptions += 1
        mode = self.config.preemption_mode
        if mode == "swap" or (mode == "auto" and victim.num_computed_tokens >= self.config.swap_min_tokens):
            mapping = self.kv.swap_out(victim)
            if mapping is not None:
                out.blocks_to_swap_out.extend(mapping)
                victim.status = RequestStatus.SWAPPED
                victim.num_swaps += 1
                self.num_swaps += 1
                self.waiting.appendleft(victim)
                return
        self.kv.free(victim)  # recompute (also the fallback when the host pool is full)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.time()

        # 1. Running requests, oldest first; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim, out)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, self.kv.block_ids(req.request_id)))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the last running request

        # 2. Waiting requests in order, while budget, seats and blocks last. No admissions in a
        # step that had to preempt: memory is short, admitting would only thrash.
        if not out.preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if req.wait_for is not None:
                    parent = req.wait_for
                    if parent.status == RequestStatus.RUNNING and parent.num_computed_tokens < parent.num_prompt_tokens - 1:
                        skipped.append(self.waiting.popleft())  # sibling: let the first sample fill the cache
                        continue
                    req.wait_for = None
                if req.status == RequestStatus.SWAPPED:
                    n = min(req.num_tokens - req.num_computed_tokens, budget)
                    if not self.kv.can_swap_in(req, n):
                        break
                    out.blocks_to_swap_in.extend(self.kv.swap_in(req))
                    ok = self.kv.allocate_slots(req, n)
                    assert ok, "can_swap_in promised room for this step's tokens"
                    num_cached = req.num_computed_tokens
                else:
                    computed, num_cached = self.kv.get_computed_blocks(req)
                    n = min(req.num_tokens - num_cached, budget)
                    if not self.kv.allocate_slots(req, n, computed):
                        break
                self.waiting.popleft()
                req.num_computed_tokens = num_cached
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = num_cached
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(req, n, self.kv.block_ids(req.request_id)))
                budget -= n
            self.waiting.extendleft(reversed(skipped))

        out.total_num_tokens = self.config.max_num_batched_tokens - budget
        return out

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled tokens now have K/V in the cache."""
        for s in out.scheduled:
            if s.request.status == RequestStatus.RUNNING:
                s.request.num_computed_tokens += s.num_new_tokens
