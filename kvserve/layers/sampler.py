"""Sampling, vectorised over the batch with per-request parameters.

Order of logit processing: logit bias, min_tokens (EOS masked), the structured-output grammar
mask (only rows whose request has a matcher: the others pay nothing), repetition / presence /
frequency penalties; logprobs are reported from this processed distribution; then
temperature, top-k, top-p, min-p, and a draw. Greedy rows take the argmax. A row with a seed
draws with its own generator, so its tokens do not depend on what else is in the batch.

A speculative verify step brings several rows of one request (its draft's positions, in order); each
is processed and drawn exactly as a one-token step at that position would be, and the scheduler
accepts the draft tokens equal to what was drawn. That is lossless for any draft (every emitted token
is a draw from the target's distribution given the tokens before it), accepts a draft token x with
probability p(x) (what rejection sampling gives a proposer that is sure of its token, as n-gram
lookup is), and with a seed gives the very tokens decoding without speculation gives.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvserve.engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # (chosen logprob, top-k) per row


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (int64 [N]): natively for float32 rows on the CPU, one pass over each row (torch's
    reduction costs ~80 us a row of SmolLM2's 49,152 logits on 2 threads, a few percent of a decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        from kvserve.kernels import cpu as native

        if native.available():
            return native.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    rows = [i for i, r in enumerate(reqs) if r.params.repetition_penalty != 1.0
            or r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    if not rows:
        return
    V = logits.shape[1]
    for i in rows:  # one row at a time: counts are sparse, and penalties are rare
        p = reqs[i].params
        out_ids = torch.tensor(reqs[i].output_token_ids, dtype=torch.long, device=logits.device)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(reqs[i].all_token_ids)), dtype=torch.long, device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out_ids.numel() and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
            counts = torch.bincount(out_ids, minlength=V).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what each row's top-k / top-p / min-p excludes. k <= 0 means off."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    V = logits.shape[1]
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
    mask = ranks >= k
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the line stays)
    cum_before = probs.cumsum(dim=-1) - probs
    mask |= cum_before >= top_p.unsqueeze(1)
    mask |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    mask[:, 0] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)


def _apply_grammar_masks(logits: torch.Tensor, reqs: list[Request], rows: list[int],
                         bits: torch.Tensor | None = None) -> None:
    """Tokens a row's grammar does not allow next go to -inf (EOS only where the grammar is complete).
    `bits`: the rows' bitmasks if already computed (Sampler.prefetch_masks)."""
    from kvserve.kernels import cpu as native
    from kvserve.structured.matcher import token_bitmasks, token_masks

    matchers = [reqs[i].grammar for i in rows]
    if bits is None:
        bits = token_bitmasks(matchers)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and native.available():
        # in place from the packed bits: no [rows, vocab] temporaries (0.3 ms a row on a 49k vocabulary)
        native.mask_logits(logits, bits, torch.tensor(rows, dtype=torch.int64))
        return
    allowed = token_masks(matchers, logits.shape[1], bits).to(logits.device, non_blocking=True)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


_mask_pool: ThreadPoolExecutor | None = None


def _settle(pending: tuple[list[Request], Future] | None) -> None:
    """Wait for a prefetch nobody will use (its matchers must not be advanced while it reads them)."""
    if pending is not None:
        pending[1].exception()


class Sampler:
    def __init__(self) -> None:
        self.grammar_mask_s = 0.0  # seconds spent computing and applying grammar masks
        self.grammar_mask_rows = 0  # rows masked (one per constrained token sampled)
        self._pending: tuple[list[Request], Future] | None = None

    def prefetch_masks(self, reqs: list[Request]) -> None:
        """Start computing the grammar masks of the step's sampling rows on a helper thread, so they
        are ready when the forward pass ends (the matchers are not touched until the post-step
        update, which runs after sampling). Called by the model runner before the forward."""
        global _mask_pool
        from kvserve.structured.matcher import token_bitmasks

        _settle(self._pending)  # a step that failed after its prefetch: let that computation end first
        matchers = [r.grammar for r in reqs if r.grammar is not None]
        if not matchers:
            self._pending = None
            return
        if _mask_pool is None:
            _mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvserve-grammar")
        self._pending = (reqs, _mask_pool.submit(token_bitmasks, matchers))

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits: [N, V] float32, one row per request that needs a token."""
        logits = logits.float()
        constrained: list[int] = []
        for i, r in enumerate(reqs):
            p = r.params
            if r.grammar is not None:
                constrained.append(i)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if len(r.output_token_ids) < p.min_tokens:
                stop = sorted(r.eos_token_ids | r.stop_token_ids)
                if stop:
                    logits[i, stop] = float("-inf")
        pending, self._pending = self._pending, None
        if constrained:
            t0 = time.perf_counter()
            bits = pending[1].result() if pending is not None and pending[0] is reqs else _settle(pending)
            _apply_grammar_masks(logits, reqs, constrained, bits)
            self.grammar_mask_s += time.perf_counter() - t0
            self.grammar_mask_rows += len(constrained)
        _apply_penalties(logits, reqs)

        want_lp = [r.params.logprobs is not None for r in reqs]
        logprobs_all = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        chosen = argmax(logits)
        if not all(r.params.greedy for r in reqs):  # (decided in Python: each torch op costs ~50 us cold)
            greedy = torch.tensor([r.params.greedy for r in reqs], device=logits.device)
            temp = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in reqs],
                                device=logits.device)
            scaled = logits / temp.unsqueeze(1)
            top_k = torch.tensor([r.params.top_k for r in reqs], device=logits.device)
            top_p = torch.tensor([r.params.top_p for r in reqs], device=logits.device)
            min_p = torch.tensor([r.params.min_p for r in reqs], device=logits.device)
            if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
                scaled = _top_k_top_p_min_p(scaled, top_k, top_p, min_p)
            probs = scaled.softmax(dim=-1)
            # Draw by inverting the CDF at one uniform number per row (a seeded row's from its own
            # generator): one number a token instead of one a vocabulary entry, so a batch of sampled
            # rows costs about what its softmax costs. The CDF is summed in float64; a token of zero
            # probability (cut by top-k / top-p / min-p) has an empty interval and is never drawn.
            u = torch.rand(len(reqs), dtype=torch.float64)
            rows_of: dict[int, int] = {}
            for r in reqs:
                rows_of[id(r)] = rows_of.get(id(r), 0) + 1
            for i, r in enumerate(reqs):
                if r.generator is not None and not r.params.greedy:
                    u[i] = torch.rand(1, generator=r.generator, dtype=torch.float64)[0]
                    if rows_of[id(r)] > 1:  # a verify step: the generator after each position's draw, so the
                        # post-step update leaves it where one-token decoding of the accepted tokens would
                        if i == 0 or reqs[i - 1] is not r:
                            r.rng_states = []
                        r.rng_states.append(r.generator.get_state())
            cdf = probs.to(torch.float64).cumsum_(dim=-1)
            at = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
            sampled = torch.searchsorted(cdf, at, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
            chosen = torch.where(greedy, chosen, sampled)

        token_ids = chosen.tolist()
        lps: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, r in enumerate(reqs):
            if not want_lp[i]:
                lps.append(None)
                continue
            row = logprobs_all[i]
            k = r.params.logprobs
            top = []
            if k:
                v, ix = row.topk(k)
                top = list(zip(ix.tolist(), v.tolist()))
            lps.append((float(row[token_ids[i]]), top))
        return SamplerOutput(token_ids, lps)
