"""Draft-model speculation: a cheaper model drafts k tokens greedily for every speculating request of a
step at once, on its own paged KV cache; the target verifies them as it verifies any draft.

The draft is another checkpoint with the target's tokenizer (`draft_model`) or the target's own weights
on the native quantized path (`self_quant`), optionally cut to its first N layers (`draft_layers`). It
runs by the engine's own code: a ModelRunner over its own cache tensors, a KVCacheManager of its own
(block tables keyed by request id, prefix caching as the engine's), and ScheduledRequests of a shadow
`Request` per target request, flattened by build_forward_batch (so the fused native step takes its
one-token rows exactly as it takes the target's).

Per request (`DraftState`): the shadow's `all_token_ids` are the target's tokens the draft has seen, and
its `num_computed_tokens` counts those whose K/V the draft cache holds; `guesses` are the draft's own
tokens computed after them, in lookahead slots (never hashed into the draft's prefix cache).

Drafting lengths L_i: forward 1 computes each request's uncomputed tokens (the target's last token; one
more after a fully accepted draft; a whole prompt the first time) and its last row's argmax is d1;
forward j computes d_{j-1} for the requests with L_i >= j and gives d_j. So max(L_i) forwards over the
batch, one row per request after the first, never one forward per request.

Rollback, when a request is next drafted for: of its guesses, the longest prefix the target kept stays
computed and the rest is forgotten (num_computed_tokens drops to the accepted prefix, and never covers
the target's last token, whose logits give the next d1); blocks past the request's tokens are freed,
blocks full of accepted tokens get their prefix-cache hash. Then forward 1 catches up. The rule needs no
hook in the verify step, so a draft cut by the scheduler (no room, no budget) rolls back the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.request import Request
from kvserve.engine.scheduler import ScheduledRequest
from kvserve.errors import InvalidRequestError
from kvserve.executor.model_runner import ModelRunner
from kvserve.layers.sampler import argmax
from kvserve.loader import LoadedModel, load_model, model_source
from kvserve.sampling_params import SamplingParams
from kvserve.spec_decode.proposer import BatchProposer

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0)  # the draft proposes its argmax: the token most likely accepted


@dataclass
class DraftState:
    shadow: Request
    guesses: list[int] = field(default_factory=list)  # draft tokens with K/V after the shadow's tokens


class DraftModelProposer(BatchProposer):
    def __init__(self, draft: LoadedModel, k: int, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device, *, vocab_size: int, max_catch_up_tokens: int, max_model_len: int,
                 enable_prefix_caching: bool = True, retain_blocks: int | None = None, max_num_seqs: int = 256) -> None:
        super().__init__(k)
        self.lm = draft
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, retain_blocks=retain_blocks)
        self.runner = ModelRunner(draft.model, num_blocks, block_size, kv_dtype, device, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len)
        self.states: dict[str, DraftState] = {}
        self.vocab_size = vocab_size  # the target's: a draft token must be one the target can take
        self.max_catch_up_tokens = max_catch_up_tokens  # per step (the engine's token budget): long prompts in chunks
        self.max_len = min(max_model_len, draft.config.max_position_embeddings)

    def release(self, request_id: str) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            self.kv.free(st.shadow)

    def follows(self, request_id: str) -> bool:
        return request_id in self.states

    def first_draft_cost(self, req: Request) -> float:
        """A request the draft does not follow yet costs it a prefill of its tokens first: an investment that
        serves every later draft, so it is spread over the tokens the request may still emit (two a step:
        drafting that pays emits more than one), not charged to one step, where it would never pay."""
        if req.request_id in self.states:
            return 0.0
        return self.draft_time.estimate(req.num_tokens) / max(1.0, (req.max_total_tokens - req.num_tokens) / 2)

    def _sync(self, req: Request) -> DraftState:
        """The request's draft state with the target's new tokens appended and rejected guesses rolled back."""
        st = self.states.get(req.request_id)
        if st is None:
            shadow = Request(req.request_id, req.prompt_token_ids, _GREEDY, [], self.max_len)
            shadow.all_token_ids.extend(req.output_token_ids)
            st = self.states[req.request_id] = DraftState(shadow)
            return st
        shadow, toks = st.shadow, req.all_token_ids
        seen = shadow.num_tokens
        kept = 0
        while kept < len(st.guesses) and seen + kept < len(toks) and toks[seen + kept] == st.guesses[kept]:
            kept += 1
        shadow.all_token_ids.extend(toks[seen:])
        shadow.num_computed_tokens = min(shadow.num_computed_tokens + kept, shadow.num_tokens - 1)
        st.guesses = []
        self.kv.rollback_slots(shadow)
        return st

    @torch.inference_mode()
    def propose_batch(self, reqs: list[Request], lengths: list[int]) -> list[list[int]]:
        t0 = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in reqs]
        first: list[ScheduledRequest] = []
        drafting: list[tuple[int, DraftState, int]] = []  # (index in reqs, state, draft length)
        budget = self.max_catch_up_tokens
        for i, (req, n_draft) in enumerate(zip(reqs, lengths)):
            n_draft = min(n_draft, self.k, self.max_len - req.num_tokens)
            if n_draft <= 0 or budget <= 0:
                continue
            old = self.states.get(req.request_id)
            if old is not None and old.shadow.num_tokens == req.num_tokens:
                continue  # not scheduled since its last draft (no budget): its guesses still stand
            fresh = old is None
            st = self._sync(req)
            shadow = st.shadow
            computed, num_cached = self.kv.get_computed_blocks(shadow) if fresh else ([], 0)
            n = shadow.num_tokens - shadow.num_computed_tokens - num_cached
            whole = n <= budget  # else a chunk of the prompt now, and no draft this step
            n = min(n, budget)
            if not self.kv.allocate_slots(shadow, n, computed, num_lookahead_tokens=n_draft - 1 if whole else 0):
                self.release(req.request_id)  # the draft cache is full: this request decodes without a draft
                continue
            shadow.num_computed_tokens += num_cached
            budget -= n
            first.append(ScheduledRequest.of(shadow, n, self.kv.block_ids(shadow.request_id)))
            if whole:
                drafting.append((i, st, n_draft))
        if first:
            tokens = self._forward(first)
            for s in first:
                s.request.num_computed_tokens += s.num_new_tokens
            for (i, st, _), tok in zip(drafting, tokens[[j for j, s in enumerate(first) if s.samples]]):
                drafts[i].append(int(tok))
        for j in range(1, max((n for _, _, n in drafting), default=0)):  # forward j + 1: computes d_j
            batch = [(i, st) for i, st, n in drafting if n > j]
            sched = []
            for i, st in batch:
                shadow = st.shadow
                st.guesses.append(drafts[i][-1])
                sched.append(ScheduledRequest(shadow, 1, self.kv.block_ids(shadow.request_id),
                                              shadow.num_tokens + j - 1, False, shadow.num_preemptions,
                                              list(st.guesses)))
            for (i, _), tok in zip(batch, self._forward(sched)):
                drafts[i].append(int(tok))
        self.seconds += time.perf_counter() - t0
        return drafts

    def _forward(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        """The draft's argmax after the last row of each scheduled piece (the engine's runner does the forward)."""
        t0 = time.perf_counter()
        batch = self.runner.prepare(scheduled)
        hidden = self.runner.hidden_states(batch)
        ends = torch.tensor([s.num_new_tokens for s in scheduled]).cumsum(0) - 1
        logits = self.lm.model.compute_logits(hidden[ends.to(hidden.device)])
        out = argmax(logits[:, : self.vocab_size]).cpu()
        self.draft_time.observe(len(batch.input_ids), time.perf_counter() - t0)
        return out


def load_draft(spec, target: LoadedModel, device: torch.device) -> LoadedModel:  # noqa: ANN001 - a SpeculativeConfig
    """The draft model of a draft_model / self_quant config, checked against the target."""
    if spec.method == "self_quant":
        if target.quantization != "none":
            raise InvalidRequestError(f"speculative_config: self_quant drafts with the target's own weights "
                                      f"quantized, so it needs a float target (quantization none, --quantization "
                                      f"none); this one runs {target.quantization} weights already")
        path = target.path
        # a quantized GGUF: its own formats ("auto" on the native path); a float checkpoint: int4
        quantized_file = getattr(model_source(path), "has_quantized_weights", lambda: False)()
        quant = spec.quantization or ("auto" if quantized_file else "int4")
    else:
        path, quant = spec.model, spec.quantization or "auto"
    draft = load_model(path, dtype=target.dtype, device=device, quantization=quant, num_layers=spec.draft_layers)
    check_vocabularies(target, draft)
    logger.info("speculative decoding: %s draft %s", spec.method, draft.describe())
    return draft


def check_vocabularies(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must map text to the same ids as the target: the same vocabulary, token for token."""
    t, d = target.tokenizer.backend.get_vocab(), draft.tokenizer.backend.get_vocab()
    if t == d:
        return
    differ = sorted(set(t.items()) ^ set(d.items()), key=lambda x: x[1])
    raise InvalidRequestError(
        f"speculative_config: the draft model {draft.path} has another tokenizer than the target {target.path} "
        f"({len(d)} tokens against {len(t)}; first difference: token {differ[0][0]!r} at id {differ[0][1]}); "
        "a draft must share the target's vocabulary")
