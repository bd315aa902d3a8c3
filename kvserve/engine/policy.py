"""Scheduling policies: who is admitted first, who runs first, who is preempted first.

A policy never schedules anything itself. The scheduler keeps its one token-budget rule
(running requests first, then waiting ones, under the budget, the seat cap and the free
blocks); a policy only gives each request a sort key, lower first, and, if it is
preemptive, says when a waiting request may take the seat (and blocks) of a running one.

  fcfs      arrival order; the scheduler keeps its historical order untouched.
  priority  `SamplingParams.priority`, lower first; preempts lower-priority running requests.
  lpf       length-predicted-first: least predicted remaining output first (a predictor that
            learns online from finished requests); a misprediction is corrected as tokens come.
  mlfq      skip-join multi-level feedback queue: a request joins the level whose quantum covers
            its prefill, and is demoted each time it uses up a level's quantum of output tokens.

Aging (lpf, mlfq; optional for priority): a request whose total time in the waiting queue
reaches `max_wait` seconds becomes "aged" for the rest of its life. Aged requests rank before
every other one, in arrival order, and cannot be preempted by a non-aged one, so no request
waits much longer than `max_wait` plus the time for the aged requests ahead of it to get a seat.
The bound is a trade-off: once most waiting requests are aged, lpf and mlfq order like fcfs, so
`max_wait` should sit well above the service time of a long request on the hardware at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kvserve.config import SCHEDULING_POLICIES as POLICIES
from kvserve.engine.length_predictor import LengthPredictor, OnlineLengthPredictor
from kvserve.engine.request import Request
from kvserve.errors import InvalidRequestError


SortKey = tuple


class SchedulingPolicy:
    """Base: arrival order, no preemption, optional aging."""

    name = "fcfs"
    preemptive = False
    # fcfs leaves the scheduler's queues in their historical order (arrival; preempted requests
    # back at the head of the waiting queue); every other policy sorts them by `key` each step.
    reorders = False

    def __init__(self, max_wait: float | None = None) -> None:
        if max_wait is not None and max_wait <= 0:
            raise InvalidRequestError(f"max_wait must be > 0 seconds, got {max_wait}")
        self.max_wait = max_wait

    # -- hooks the scheduler calls ---------------------------------------------------------

    def on_add(self, req: Request) -> None:
        """A request entered the scheduler."""

    def on_finish(self, req: Request) -> None:
        """A request finished normally (not aborted)."""

    # -- ordering ---------------------------------------------------------------------------

    def rank(self, req: Request) -> SortKey:
        """The policy's own order for non-aged requests, lower first."""
        return (req.arrival_time,)

    def is_aged(self, req: Request, now: float) -> bool:
        if not req.aged and self.max_wait is not None and req.waited(now) >= self.max_wait:
            req.aged = True  # sticky: an aged request keeps its protection until it finishes
        return req.aged

    def key(self, req: Request, now: float) -> SortKey:
        if self.is_aged(req, now):
            return (0, req.arrival_time)
        return (1, *self.rank(req))

    def should_preempt(self, cand: Request, victim: Request, now: float) -> bool:
        """May waiting `cand` take the seat (and blocks) of running `victim`? Only for preemptive policies."""
        cand_aged, victim_aged = self.is_aged(cand, now), self.is_aged(victim, now)
        if victim_aged:
            return False
        if cand_aged:
            return True
        return self._outranks(cand, victim)

    def _outranks(self, cand: Request, victim: Request) -> bool:
        return self.rank(cand) < self.rank(victim)


class FCFSPolicy(SchedulingPolicy):
    pass


class PriorityPolicy(SchedulingPolicy):
    """Static priority, lower first; ties in arrival order. Strict unless `max_wait` is set."""

    name = "priority"
    preemptive = True
    reorders = True

    def rank(self, req: Request) -> SortKey:
        return (req.priority, req.arrival_time)

    def _outranks(self, cand: Request, victim: Request) -> bool:
        return cand.priority < victim.priority  # equal priority never preempts: no thrashing


class LPFPolicy(SchedulingPolicy):
    """Length-predicted-first: least predicted remaining output tokens first."""

    name = "lpf"
    preemptive = True
    reorders = True

    def __init__(self, max_wait: float | None = 30.0, predictor: LengthPredictor | None = None,
                 preempt_ratio: float = 2.0) -> None:
        super().__init__(max_wait)
        self.predictor = predictor or OnlineLengthPredictor()
        # hysteresis: preempt only for a candidate with at most 1/ratio of the victim's remaining
        # work, so two requests of similar length never evict each other back and forth
        self.preempt_ratio = preempt_ratio

    def on_add(self, req: Request) -> None:
        if req.predicted_output_tokens is None:
            req.predicted_output_tokens = float(self.predictor.predict(req))

    def on_finish(self, req: Request) -> None:
        self.predictor.observe(req)

    @staticmethod
    def remaining(req: Request) -> float:
        """Predicted output tokens still to come, corrected by what has been produced so far."""
        pred = req.predicted_output_tokens if req.predicted_output_tokens is not None else 0.0
        done = len(req.output_token_ids)
        # Past its prediction, a request is longer than thought: expect as much again as it has
        # produced (heavy-tailed lengths have a residual life that grows with age).
        rem = pred - done if done < pred else float(max(done, 1))
        return max(min(rem, req.max_total_tokens - req.num_tokens), 0.0)

    def rank(self, req: Request) -> SortKey:
        return (self.remaining(req), req.arrival_time)

    def _outranks(self, cand: Request, victim: Request) -> bool:
        return self.remaining(cand) * self.preempt_ratio < self.remaining(victim)


class MLFQPolicy(SchedulingPolicy):
    """Skip-join MLFQ: level i has a quantum of base * 2**i output tokens; lower levels run first.

    A request skips the levels whose quantum is shorter than its prefill (prompt tokens divided
    by `prefill_tokens_per_step`, the prefill tokens that cost about one decode step), so a long
    prompt does not get preempted right after its expensive first step. Levels are a function of
    the tokens produced, so demotion needs no extra state and is exact at token granularity.
    """

    name = "mlfq"
    preemptive = True
    reorders = True

    def __init__(self, max_wait: float | None = 30.0, num_levels: int = 6, base_quantum: int = 8,
                 prefill_tokens_per_step: int = 64) -> None:
        super().__init__(max_wait)
        if num_levels < 1 or base_quantum < 1 or prefill_tokens_per_step < 1:
            raise InvalidRequestError("mlfq: num_levels, base_quantum and prefill_tokens_per_step must be >= 1")
        self.num_levels = num_levels
        self.base_quantum = base_quantum
        self.prefill_tokens_per_step = prefill_tokens_per_step

    def quantum(self, level: int) -> int:
        return self.base_quantum * 2**level

    def join_level(self, num_prompt_tokens: int) -> int:
        steps = num_prompt_tokens / self.prefill_tokens_per_step
        level = 0
        while level < self.num_levels - 1 and self.quantum(level) < steps:
            level += 1
        return level

    def level(self, req: Request) -> int:
        level = self.join_level(req.num_prompt_tokens)
        used = len(req.output_token_ids)
        while level < self.num_levels - 1 and used >= self.quantum(level):
            used -= self.quantum(level)
            level += 1
        return level

    def rank(self, req: Request) -> SortKey:
        return (self.level(req), req.arrival_time)

    def _outranks(self, cand: Request, victim: Request) -> bool:
        return self.level(cand) < self.level(victim)


def make_policy(name: str, max_wait: float | None = None, **kwargs: object) -> SchedulingPolicy:
    """Policy by name; `max_wait` None keeps the policy's default aging bound."""
    factories: dict[str, Callable[..., SchedulingPolicy]] = {
        "fcfs": FCFSPolicy, "priority": PriorityPolicy, "lpf": LPFPolicy, "mlfq": MLFQPolicy,
    }
    if name not in factories:
        raise InvalidRequestError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}")
    if max_wait is not None:
        kwargs["max_wait"] = max_wait
    return factories[name](**kwargs)


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b of two equally long sequences (O(n^2); for reports, not the hot path)."""
    n = len(xs)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else 0.0
