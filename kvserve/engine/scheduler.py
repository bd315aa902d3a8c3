"""Token-budget scheduler: no prefill phase, no decode phase.

Every step, running requests (decodes and unfinished prefill chunks) are served first, in
order, then waiting ones; each gets the tokens it needs to catch `num_computed_tokens` up
with `num_tokens`, cut to the remaining budget (`max_num_batched_tokens`). A long prompt
therefore runs in chunks beside everyone else's decodes. When blocks run out, the most
recently admitted running request is preempted: its blocks are freed and it is recomputed
later, or (preemption_mode swap/auto) its blocks are copied to a host pool and back.

A SchedulingPolicy (engine/policy.py) only decides order: fcfs keeps the queues as they are;
the others sort both queues by the policy's key each step, so the budget goes to the best-ranked
requests first and memory preemption takes the worst-ranked one, and a preemptive policy may
evict a worse-ranked running request to give its seat and blocks to a better-ranked waiting one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.policy import FCFSPolicy, SchedulingPolicy
from kvserve.engine.request import Logprob, Request, RequestStatus
from kvserve.spec_decode.adaptive import Acceptance, DraftLengthController
from kvserve.spec_decode.proposer import BatchProposer
from kvserve.spec_decode.stats import SpecDecodeStats

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    """One request's share of a step, frozen when it was scheduled (the request moves on afterwards)."""

    request: Request
    num_new_tokens: int  # tokens computed this step, starting at `start` (draft tokens included)
    block_ids: list[int]
    start: int = 0  # request.num_computed_tokens when scheduled: the first position computed
    samples: bool = False  # the step reaches the end of the request's tokens: its last logits give a new token
    num_preemptions: int = 0  # request.num_preemptions when scheduled: a later preemption voids the result
    # speculative draft tokens after the request's last token, computed at positions num_tokens ..; the
    # runner returns the target's token at each of the 1 + len(spec_token_ids) positions
    spec_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, request: Request, num_new_tokens: int, block_ids: list[int],
           spec_token_ids: list[int] | None = None) -> "ScheduledRequest":
        start = request.num_computed_tokens
        spec = spec_token_ids or []
        return cls(request, num_new_tokens + len(spec), block_ids, start,
                   start + num_new_tokens == request.num_tokens, request.num_preemptions, spec)

    @property
    def num_sampled_rows(self) -> int:
        """Positions whose logits give a token: the last one, and one per draft token."""
        return (1 + len(self.spec_token_ids)) if self.samples else 0


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
class RunnerOutput:
    """What the model runner hands back for one SchedulerOutput."""

    # request id -> new tokens: one, or with a draft the target's token at each of its 1 + k positions
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[Logprob]] = field(default_factory=dict)  # one per sampled token, when asked
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)  # this step's chunk


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    preemption_mode: str = "recompute"  # recompute | swap | auto
    # auto: swap a victim with at least this many computed tokens, recompute shorter ones
    swap_min_tokens: int = 256


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: SchedulingPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy or FCFSPolicy()
        self.clock = clock  # the simulator drives the same scheduler on a virtual clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swaps = 0
        # ids of requests in a batch whose result is not back yet (schedule() adds, update_from_output()
        # removes): under pipelining several batches are in flight, and a request's next tokens depend on its last
        self.in_flight: set[str] = set()
        # speculative decoding (kvserve/spec_decode): asked for a draft when a decoding request is scheduled
        # an object with .k and .propose(token_ids, k) -> list[int] (lookup), or a BatchProposer (a draft
        # model: spec_decode/proposer.py); None: off
        self.proposer = None
        self.draft_control: DraftLengthController | None = None  # adaptive draft lengths; None: always k
        self.jump_forward = False  # structured outputs: append grammar-forced tokens without a draw
        self.spec_stats = SpecDecodeStats()

    def add(self, req: Request) -> None:
        self.policy.on_add(req)
        self.waiting.append(req)
        self.requests[req.request_id] = req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Finish (or abort) a request anywhere in its life; frees its blocks."""
        if req.is_finished:
            return
        now = self.clock()
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        if req.queued_since is not None:
            req.queue_time += max(now - req.queued_since, 0.0)
            req.queued_since = None
        self.kv.free(req)
        self._release_draft(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        self.requests.pop(req.request_id, None)
        if reason != "abort":
            if req.detokenizer is not None:
                req.detokenizer.flush()  # a trailing partial character is released (no-op after a stop string)
            self.policy.on_finish(req)

    def _preempt(self, victim: Request, out: SchedulerOutput, now: float) -> None:
        victim.num_preemptions += 1
        self.num_preemptions += 1
        victim.queued_since = now
        out.preempted.append(victim.request_id)
        self._release_draft(victim)
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

    def _make_room(self, out: SchedulerOutput, now: float) -> None:
        """Preemptive policies: evict worse-ranked running requests for the seats and blocks of better-ranked waiting ones.

        Runs before the running requests are scheduled, so no victim is already in this step's
        batch. Block needs are estimated without prefix hits (conservative); what one candidate
        claims is reserved so the next candidate does not count the same seat or blocks.
        """
        cfg, pool = self.config, self.kv.pool
        seats, blocks = 0, 0  # reserved for candidates already placed
        for cand in list(self.waiting):  # sorted by key; victims appended meanwhile are not candidates
            if cand.wait_for is not None:
                continue
            n = min(cand.num_tokens - cand.num_computed_tokens, cfg.max_num_batched_tokens)
            base = cand.num_computed_tokens if cand.status == RequestStatus.SWAPPED else 0
            need = self.kv.blocks_needed(base + n)
            while len(self.running) + seats >= cfg.max_num_seqs or pool.num_free_blocks - blocks < need:
                if not self.running or not self.policy.should_preempt(cand, self.running[-1], now):
                    return  # candidates are in rank order: a worse one will not preempt either
                self._preempt(self.running.pop(), out, now)
            seats += 1
            blocks += need

    def schedule(self, max_seqs: int | None = None) -> SchedulerOutput:
        """This step's batch; `max_seqs` caps its sequences below max_num_seqs (pipeline micro-batches).

        Every request scheduled is in flight until `update_from_output` gets this output back."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = self.clock()

        if self.policy.reorders:
            key = lambda r: self.policy.key(r, now)  # noqa: E731
            self.running.sort(key=key)  # stable: equal keys keep their order
            self.waiting = deque(sorted(self.waiting, key=key))
            if self.policy.preemptive and self.waiting and self.running:
                self._make_room(out, now)
                self.waiting = deque(sorted(self.waiting, key=key))
        policy_preempted = len(out.preempted)

        planned = self._plan_drafts(budget) if self.proposer is not None else {}

        # 1. Running requests in order (fcfs: oldest first; else by policy key); preempt from the back
        # (the newest, or the worst-ranked) when blocks run out.
        cap = min(max_seqs or self.config.max_num_seqs, self.config.max_num_seqs)
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            req = self.running[i]
            if self.in_flight and req.request_id in self.in_flight:
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = planned.get(req.request_id, [])[: max(0, budget - n)] if n == 1 else []
            # a draft never preempts for its slots: without room for them the request decodes one token as
            # usual (the draft's blocks can still leave less room for requests scheduled after it this step)
            if draft and self.kv.allocate_slots(req, n, num_lookahead_tokens=len(draft)):
                out.scheduled.append(ScheduledRequest.of(req, n, self.kv.block_ids(req.request_id), draft))
                budget -= n + len(draft)
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim, out, now)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest.of(req, n, self.kv.block_ids(req.request_id)))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the last running request

        # 2. Waiting requests in order, while budget, seats and blocks last. No admissions in a
        # step that had to preempt for memory: memory is short, admitting would only thrash.
        if len(out.preempted) == policy_preempted:
            skipped: list[Request] = []
            while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
                   and len(out.scheduled) < cap):
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
                if req.queued_since is not None:
                    req.queue_time += max(now - req.queued_since, 0.0)
                    req.queued_since = None
                req.num_computed_tokens = num_cached
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = num_cached
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                out.scheduled.append(ScheduledRequest.of(req, n, self.kv.block_ids(req.request_id)))
                budget -= n
            self.waiting.extendleft(reversed(skipped))

        out.total_num_tokens = self.config.max_num_batched_tokens - budget

        self.in_flight.update(x.request.request_id for x in out.scheduled)
        return out

    @staticmethod
    def can_speculate(req: Request) -> bool:
        """Whether a request's next tokens can be verified several at once, the tokens unchanged.

        Each draft position's token is drawn as a one-token step at that position would draw it (the
        argmax, or a sample with the request's own generator: see layers/sampler.py), and draft tokens
        equal to what was drawn are accepted. A constrained request (its matcher would have to advance
        along the draft) and one with penalties or an unmet min_tokens (their logit changes depend on
        the tokens before each position) decode one token at a time."""
        p = req.params
        return (req.grammar is None and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and p.frequency_penalty == 0.0 and len(req.output_token_ids) >= p.min_tokens)

    def _release_draft(self, req: Request) -> None:
        """A request leaves the running set: a draft model's state of it (its draft KV blocks) goes."""
        if isinstance(self.proposer, BatchProposer):
            self.proposer.release(req.request_id)

    def _plan_drafts(self, budget: int) -> dict[str, list[int]]:
        """This step's draft per decoding request that can speculate (its one uncomputed token is its
        last), cut to the tokens it may still emit (1 + len(draft) at most) and, with adaptive draft
        lengths, to what the step's cost buys (spec_decode/adaptive.py); requests without one are absent.

        A lookup proposer's drafts are found first (they are free) and then cut; a BatchProposer's
        lengths are chosen first, its drafting cost counted, and then all drafts made in one call."""
        control = self.draft_control
        batched = isinstance(self.proposer, BatchProposer)
        cands: list[tuple[Request, int]] = []  # (request, the longest draft it may get)
        found: list[list[int]] = []  # a lookup proposer's draft of each candidate
        kinds: list[int | None] = []  # and its kind, where the proposer tells (an n-gram match's length)
        lookup = getattr(self.proposer, "lookup", None)
        base = 0
        for req in self.running:
            if self.in_flight and req.request_id in self.in_flight:
                continue
            need = req.num_tokens - req.num_computed_tokens
            base += need
            if need != 1 or not self.can_speculate(req):
                continue
            k = min(self.proposer.k, req.max_total_tokens - req.num_tokens - 1)
            if batched and k > 0:
                cands.append((req, k))
                continue
            if k <= 0:
                draft, kind = [], None
            elif lookup is not None:
                draft, kind = lookup(req.all_token_ids, k)
            else:
                draft, kind = self.proposer.propose(req.all_token_ids, k), None
            draft = draft[:k]
            if draft:
                cands.append((req, len(draft)))
                found.append(draft)
                kinds.append(kind)
            elif control is not None and req.draft_record is not None:
                control.idle(req.draft_record)
        if not cands:
            return {}
        lengths = [k for _, k in cands]
        if control is not None:
            seats = self.config.max_num_seqs - len(self.running)
            for req in self.waiting:  # prompt tokens the step may also carry: only those with a seat to take
                if base >= budget or seats <= 0:
                    break
                base += req.num_tokens - req.num_computed_tokens
                seats -= 1
            for i, (req, _) in enumerate(cands):
                if req.draft_record is None:
                    req.draft_record = Acceptance()
                req.draft_record.kind = kinds[i] if kinds else None
            lengths = control.choose(min(base, budget),
                                     [(control.acceptance(r.draft_record, r.draft_record.kind), k) for r, k in cands],
                                     self.proposer.draft_time if batched else None,
                                     [self.proposer.first_draft_cost(r) for r, _ in cands] if batched else None)
            interval = control.probe_interval(min(base, budget), len(cands))
            for i, (req, _) in enumerate(cands):
                if not lengths[i]:  # a probe re-measures acceptance; never a draft model's first draft (a prefill)
                    if control.probe(req.draft_record, interval) and (not batched or
                                                                      self.proposer.follows(req.request_id)):
                        lengths[i] = 1
                    else:
                        control.idle(req.draft_record)
        if batched:
            chosen = [(r, n) for (r, _), n in zip(cands, lengths) if n]
            drafts = self.proposer.propose_batch([r for r, _ in chosen], [n for _, n in chosen]) if chosen else []
            return {r.request_id: d for (r, _), d in zip(chosen, drafts) if d}
        return {r.request_id: d[:n] for (r, _), d, n in zip(cands, found, lengths) if n}

    @staticmethod
    def _jump_forward(r: Request) -> str | None:
        """Append the tokens the request's grammar forces next (jump-forward decoding): no draw, their K/V
        computed in the next step with the token that follows; each stop-checked. Returns a finish reason."""
        g = r.grammar
        for tok in g.forced_tokens():
            if r.generator is not None and not r.params.greedy:
                torch.rand(1, generator=r.generator, dtype=torch.float64)  # the draw a step would make, so a
                # seeded request's later draws are those of decoding without jump-forward
            if not g.accept(tok):
                return "stop"  # cannot happen for a forced token; stop rather than emit a broken state
            r.append_token(tok)
            reason = r.check_stop()
            if reason is None and g.is_done:
                reason = "stop"
            if reason is not None:
                return reason
        return None

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """THE post-step update; returns the requests it finished.

        For each scheduled request: its scheduled tokens now have K/V in the cache; its prompt
        logprobs of this chunk are kept; each sampled token (one, or several when speculative
        tokens were accepted) is appended and checked against the stop rules (EOS and stop ids
        after min_tokens, stop strings through the request's detokenizer, the length limit, a
        structured-output grammar that is complete; a constrained request's matcher consumes each
        token before it is appended); at the first stop the request finishes, its blocks freed,
        and later tokens are dropped.
        A request preempted or aborted while its batch ran (pipelining) has the result dropped.

        Speculation: a request scheduled with a draft gets the target's token at each draft position
        and one after; the longest prefix of the draft equal to the target's tokens is accepted, plus the
        target's next token (so 1 .. k+1 tokens, each stop-checked as above). The rejected positions
        are rolled back: num_computed_tokens counts the accepted ones only, the blocks past the
        request's tokens are freed and only blocks filled by accepted tokens get a prefix-cache hash.
        """
        now = self.clock()
        finished: list[Request] = []
        for s in out.scheduled:
            r = s.request
            rid = r.request_id
            self.in_flight.discard(rid)
            if r.status != RequestStatus.RUNNING or r.num_preemptions != s.num_preemptions:
                continue
            spec = s.spec_token_ids
            tokens = result.sampled.get(rid)
            lps = result.logprobs.get(rid)
            if spec:
                assert tokens is not None and len(tokens) == len(spec) + 1, "a verify step returns 1 + k tokens"
                accepted = 0
                while accepted < len(spec) and spec[accepted] == tokens[accepted]:
                    accepted += 1
                self.spec_stats.observe(len(spec), accepted)
                if r.rng_states:  # seeded sampling: as if only the accepted positions and the next were drawn
                    r.generator.set_state(r.rng_states[accepted])
                    r.rng_states = []
                if self.draft_control is not None and r.draft_record is not None:
                    self.draft_control.observe(r.draft_record, len(spec), accepted)
                r.num_computed_tokens += s.num_new_tokens - (len(spec) - accepted)
                tokens = tokens[: accepted + 1]
                if lps:
                    lps = lps[: accepted + 1]
            else:
                r.num_computed_tokens += s.num_new_tokens
            prompt_lps = result.prompt_logprobs.get(rid)
            if prompt_lps is not None:
                if not r.prompt_logprobs:
                    r.prompt_logprobs.append(None)  # the first prompt token has no logprob
                r.prompt_logprobs.extend(prompt_lps)
            if not tokens:
                continue
            if r.first_token_time is None:
                r.first_token_time = now
            for j, tok in enumerate(tokens):
                g = r.grammar
                if g is not None:
                    assert g.num_tokens == len(r.output_token_ids), "grammar matcher out of step with the request"
                    if not g.accept(tok):  # the mask allowed it: only a broken state lands here
                        logger.error("request %s: token %d rejected by its grammar (%s); stopping it", rid, tok,
                                     g.error or "not allowed")
                        self.finish(r, "stop")
                        finished.append(r)
                        break
                r.append_token(tok, lps[j] if lps else None)
                reason = r.check_stop()
                if reason is None and g is not None and g.is_done:
                    reason = "stop"  # the grammar is complete: only EOS could follow, save its step
                if reason is not None:
                    self.finish(r, reason)
                    finished.append(r)
                    break
            if self.jump_forward and r.grammar is not None and not r.is_finished and r.params.logprobs is None:
                reason = self._jump_forward(r)
                if reason is not None:
                    self.finish(r, reason)
                    finished.append(r)
            if spec and not r.is_finished:
                self.kv.rollback_slots(r)
        return finished
