"""Adaptive draft lengths: speculate only as far as the step's extra cost buys tokens.

A verify step that carries k draft tokens of a request computes k more positions. While the step is
memory-bound (few tokens: the weights stream once whatever the batch) that is almost free; once it
is compute-bound (a large batch, or a CPU, where a step is compute-bound from a handful of tokens)
each position costs about what a real token costs, and drafts the target rejects slow everyone down.
So the length of each request's draft is chosen every step from two things the engine measures:

- **what a step costs** as a function of its tokens (`StepTimeModel`, learnt from the steps of one-token
  rows it ran: a count's own average where it was seen often, else a line fit through the counts near
  the step's size);
- **how likely each draft position is to be accepted**: per request, from its own verify results,
  with the engine's overall acceptance as the prior; position j (1-based) of a draft survives with
  probability a^j when each token is accepted with probability a given the ones before. Where the
  proposer says what kind of draft it has (n-gram lookup: the length of the match), the engine's
  acceptance of that kind moves the request's estimate by its odds against the engine's overall odds,
  so a request drafts far after a long match and little or nothing after a one-token one.

`DraftLengthController.choose` then keeps the draft positions, most probable first, that maximise
expected tokens emitted per second of step: (base tokens + sum of kept probabilities) / time(base
tokens + kept positions), where a draft model's own forwards count in the time too. No fixed batch-size
cut-off: the machine's own step times decide.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass


class StepTimeModel:
    """Seconds a step takes as a function of the tokens it computes, from the steps observed.

    One running average per token count (exact up to 128 tokens, then in buckets of 32); between
    observed counts the time is interpolated linearly, below the smallest it is that one's time (a
    step cannot get cheaper than its weights' streaming), and above the largest it grows in
    proportion to the tokens (compute-bound: the cautious guess). A `prior` (a guess by token count)
    answers before any observation, and below the smallest observed count where it says less.

    Measured times err high, never low: a count's first step is often cold (an engine's first forward,
    a new GEMM shape, pages of the KV cache touched for the first time) and a busy CPU slows any step.
    So a count's second observation replaces its first instead of averaging with it, and the curve is
    made non-decreasing from the top down: a count costs at most what any larger count was seen to
    cost. (Made monotone from the bottom up, one cold step of 10 tokens priced every later step of 16
    at its 0.5 s, four times their cost, and drafting looked free.)"""

    def __init__(self, weight: float = 0.2, prior: Callable[[int], float] | None = None) -> None:
        self.weight = weight  # of a new observation in its count's running average
        self.prior = prior  # the estimate before any observation (None: 0.0)
        self._mean: dict[int, float] = {}
        self._seen: dict[int, int] = {}  # observations per count (only whether past the first matters)
        self._curve: tuple[list[int], list[float]] | None = None

    @staticmethod
    def bucket(num_tokens: int) -> int:
        return num_tokens if num_tokens <= 128 else num_tokens // 32 * 32

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0.0:
            return
        b = self.bucket(num_tokens)
        old, seen = self._mean.get(b), self._seen.get(b, 0)
        self._mean[b] = seconds if seen <= 1 else old + self.weight * (seconds - old)
        self._seen[b] = seen + 1
        self._curve = None

    @property
    def empty(self) -> bool:
        return not self._mean

    @property
    def counts(self) -> list[int]:
        """The token counts (buckets) observed, ascending."""
        return sorted(self._mean)

    def _points(self) -> tuple[list[int], list[float]]:
        if self._curve is None:
            xs = sorted(self._mean)
            ys = [self._mean[x] for x in xs]
            for i in range(len(ys) - 2, -1, -1):
                ys[i] = min(ys[i], ys[i + 1])
            self._curve = (xs, ys)
        return self._curve

    # a count's weight in `line`: its observations after the first, at most LINE_CAP (its running average
    # weighs about the last 9: one seen often is not 100x surer); a count seen once only FIRST_WEIGHT (that
    # first step is the one most often cold)
    LINE_CAP = 8
    FIRST_WEIGHT = 0.25

    def line(self, at: int, fallback: "StepTimeModel | None" = None) -> tuple[float, float]:
        """(seconds of a step of `at` tokens, seconds per token more) from a line fit by weighted least
        squares through the observed counts near `at` (each count's weight, above, halved at twice or half
        `at` and falling off with the squared log-distance beyond).

        What a draft costs is the slope near the step's size, and steps are noisy (+-10-20% on a shared
        VM): read off two neighbouring counts of the curve, one slow step at a count seen once (12 rows
        when four requests finished together) made the counts above it look free, and a batch of 12 drafted
        every step at 0.4 acceptance (chat at batch 16, 0.93x). The fit pools every count near `at`, most
        of all the often-seen one. With one count near it (no slope to read) the slope is `fallback`'s
        where it has one (the engine's every-step times, prompt chunks included: a guess low enough that a
        first draft is tried and its step measured; a draft model's requests never probe, so a proportional
        guess from a batch-1 engine's one observed count never drafted at all), else the cost grows in
        proportion to the tokens, as `estimate` above its largest count."""
        xs = sorted(self._mean)
        if not xs:
            t = self.prior(at) if self.prior is not None else 0.0
            return t, (self.prior(at + 1) - t if self.prior is not None else 0.0)
        sw = sx = sy = sxx = sxy = 0.0
        for x in xs:
            seen = self._seen[x]
            w = (self.FIRST_WEIGHT if seen == 1 else min(seen - 1, self.LINE_CAP)) / (1.0 + math.log2(x / max(at, 1)) ** 2)
            sw += w
            sx += w * x
            sy += w * self._mean[x]
            sxx += w * x * x
            sxy += w * x * self._mean[x]
        mx, my = sx / sw, sy / sw
        var = sxx / sw - mx * mx
        if len(xs) < 2 or var <= 1e-12 * max(1.0, mx * mx):
            t = self.estimate(at)
            if fallback is not None and len(fallback._mean) >= 2:
                return t, fallback.line(at)[1]
            return t, t / max(at, xs[0])
        slope = max(0.0, (sxy / sw - mx * my) / var)
        t = my + slope * (at - mx)
        return (t if t > 0.0 else self.estimate(at)), slope

    SURE = 3  # observations from which a count's own running average prices it in `costs`

    def costs(self, base: int, extra: int, fallback: "StepTimeModel | None" = None) -> list[float]:
        """Seconds of a step of base + n tokens for n = 0 .. extra: a count's own running average where it
        was seen SURE times or more (counts up to 128, which have one each), else the `line` through the
        counts near `base`.

        The line alone misses steps in the curve: the GEMMs run rows in register tiles (4 rows on AVX-512),
        so a row past a multiple of 4 starts a tile that reads every weight again from cache. At batch 16
        on Zen 4, 16 rows took 24.3 ms, 17 rows 26.9 and each row after that ~0.9 ms more: the line (1.2
        ms a row) priced the 17th row at half its cost, and chat drafts that the target mostly accepted
        still cost 4%. Counts seen often are measured, not interpolated."""
        t0, per_token = self.line(base, fallback)
        out = []
        for n in range(extra + 1):
            c = base + n  # (past 128 tokens the counts share buckets of 32: a bucket's average would make
            # every position inside it look free, so the line prices them)
            sure = c <= 128 and self._seen.get(c, 0) >= self.SURE
            out.append(self._mean[c] if sure else t0 + per_token * n)
        return out

    def estimate(self, num_tokens: int) -> float:
        """Expected seconds of a step of `num_tokens` tokens (the prior's, or 0.0, before any observation)."""
        xs, ys = self._points()
        if not xs:
            return self.prior(num_tokens) if self.prior is not None else 0.0
        if num_tokens < xs[0] and self.prior is not None:  # a draft model's first forwards are prompt catch-ups
            return min(ys[0], self.prior(num_tokens))
        if num_tokens <= xs[0]:
            return ys[0]
        if num_tokens >= xs[-1]:
            return ys[-1] * num_tokens / xs[-1]
        i = bisect.bisect_left(xs, num_tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)


@dataclass
class Acceptance:
    """A request's draft record: accepted tokens and rejections, both decayed so it follows change."""

    accepted: float = 0.0
    rejected: float = 0.0
    idle_steps: int = 0  # steps without a draft since its last verify result
    kind: int | None = None  # the kind of its latest draft (an n-gram match's length), None: not known


class DraftLengthController:
    """Chooses each request's draft length in a step (see the module docstring)."""

    PRIOR = 2.0  # weight, in verify results, of the engine-wide acceptance for a request's estimate
    DECAY = 0.8  # of a request's record per verify result, so recent drafts count most
    IDLE_DECAY = 0.95  # per step without a draft: the record fades back to the prior, so drafting is retried
    # idle steps after which a request drafts one token even where the choice says none: its acceptance
    # (and the step time with one more position) is measured again, so an unlucky start or a stale
    # estimate cannot stop drafting for good (the prior alone may never make a first draft pay). A probe
    # costs one position of a step; where a position costs about what a token does (compute-bound: a
    # large batch, or float32 rows on a CPU) the wait grows so that probes take at most PROBE_SHARE of
    # the step time (16 float32 rows on 2 AVX2 cores: one probe per request every ~100 steps, not 32,
    # where every 32 cost 3% of a batch-16 chat run's time for drafts 0.2 of which were accepted)
    PROBE_AFTER = 32
    PROBE_SHARE = 0.01

    def __init__(self, step_time: StepTimeModel | None = None) -> None:
        self.step_time = step_time or StepTimeModel()  # steps of one-token rows (decodes and their drafts)
        self.any_step_time = StepTimeModel()  # every step, prompt chunks too: a draft model's prior (llm_engine)
        self.accepted = 1.0  # engine-wide, undecayed (with a prior of one accepted and one rejected)
        self.rejected = 1.0
        self.kinds: dict[int, list[float]] = {}  # per kind of draft, engine-wide: [accepted, rejected]

    def acceptance(self, rec: Acceptance | None, kind: int | None = None) -> float:
        """Probability that a draft token is accepted given the ones before it were: the request's record
        with the engine's acceptance as the prior, and, for a draft of a known `kind`, times the odds of
        that kind against the engine's (log-odds added: the request's and the kind's evidence combined)."""
        prior = self.accepted / (self.accepted + self.rejected)
        a = prior if rec is None else (rec.accepted + self.PRIOR * prior) / (rec.accepted + rec.rejected + self.PRIOR)
        seen = self.kinds.get(kind) if kind is not None else None
        if seen is None:
            return a
        ak = (seen[0] + self.PRIOR * prior) / (seen[0] + seen[1] + self.PRIOR)  # few results: near the prior

        def logit(x: float) -> float:
            x = min(max(x, 1e-4), 1 - 1e-4)
            return math.log(x / (1 - x))

        return 1.0 / (1.0 + math.exp(-(logit(a) + logit(ak) - logit(prior))))

    def observe(self, rec: Acceptance, num_draft: int, num_accepted: int) -> None:
        """A verify result: `num_accepted` of `num_draft` draft tokens agreed with the target (a draft of
        the record's `kind`, when known)."""
        rejected = 1.0 if num_accepted < num_draft else 0.0
        rec.accepted = rec.accepted * self.DECAY + num_accepted
        rec.rejected = rec.rejected * self.DECAY + rejected
        rec.idle_steps = 0
        self.accepted += num_accepted
        self.rejected += rejected
        if rec.kind is not None:
            seen = self.kinds.setdefault(rec.kind, [0.0, 0.0])
            seen[0] += num_accepted
            seen[1] += rejected

    def idle(self, rec: Acceptance) -> None:
        rec.accepted *= self.IDLE_DECAY
        rec.rejected *= self.IDLE_DECAY
        rec.idle_steps += 1

    def probe_interval(self, base_tokens: int, num_requests: int) -> int:
        """Idle steps before a probe, in a step of `base_tokens` tokens where `num_requests` requests may
        probe: PROBE_AFTER, or more where one position more costs enough that their probes would take
        over PROBE_SHARE of the step time."""
        t, t1 = self.step_time.costs(base_tokens, 1, self.any_step_time)
        extra = t1 - t
        if not t > 0.0 or not extra > 0.0:
            return self.PROBE_AFTER
        return max(self.PROBE_AFTER, math.ceil(num_requests * extra / (self.PROBE_SHARE * t) - 1e-9))

    def probe(self, rec: Acceptance, interval: int | None = None) -> bool:
        """Whether a request the choice left without a draft drafts one token anyway (after `interval` idle
        steps: probe_interval's, PROBE_AFTER by default)."""
        return rec.idle_steps >= (self.PROBE_AFTER if interval is None else interval)

    def choose(self, base_tokens: int, drafts: list[tuple[float, int]],
               draft_time: StepTimeModel | None = None, upfront: list[float] | None = None) -> list[int]:
        """Draft lengths for a step that computes `base_tokens` tokens without drafts, given per
        candidate request (acceptance probability, longest draft it has): the lengths that maximise
        expected tokens emitted per second. Before any step was timed every draft is kept whole.

        `draft_time`: where drafting itself costs (a draft model runs one forward per draft position
        over the requests drafting that far), the seconds of one draft forward by its rows; the step's
        time is then the target's plus each draft forward's. None: drafts are free (n-gram lookup).
        `upfront`: seconds a request's first draft position adds once (a draft model's prefill of a prompt
        it has not seen, spread over the request's remaining tokens by the proposer)."""
        if self.step_time.empty or not drafts:
            return [k for _, k in drafts]
        # every draft position j with its survival probability a^j, most probable first
        cand = sorted(((a ** j, i, j) for i, (a, k) in enumerate(drafts) for j in range(1, k + 1)), reverse=True)
        rows = [0] * (max(k for _, k in drafts) + 1)  # requests in draft forward j so far
        gain, drafting, best, best_n = float(base_tokens), 0.0, -1.0, 0
        secs = self.step_time.costs(base_tokens, len(cand), self.any_step_time)
        for n in range(len(cand) + 1):
            if n:
                p, i, j = cand[n - 1]
                gain += p
                if draft_time is not None:  # one more row in forward j (the first row pays its whole cost)
                    rows[j] += 1
                    drafting += draft_time.estimate(rows[j]) - (draft_time.estimate(rows[j] - 1) if rows[j] > 1 else 0.0)
                if upfront is not None and j == 1:
                    drafting += upfront[i]
            rate = gain / (secs[n] + drafting)
            if rate > best:
                best, best_n = rate, n
        lengths = [0] * len(drafts)
        for _, i, _ in cand[:best_n]:  # a^j decreases in j: the kept positions of a request are its first ones
            lengths[i] += 1
        return lengths
