"""ForwardBatch: one step's flat token batch and everything derived from it, built once per step.

The runner (and, on rank 0 of a parallel engine, the parallel runner) reads from it which rows
need logits (each sampling sequence's last token, then each prompt-logprob span) and, on a CPU
with the fused native step, which tokens take that path; nothing re-derives them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kvserve.engine.request import Logprob, Request
from kvserve.engine.scheduler import ScheduledRequest
from kvserve.layers.attention import AttentionMetadata

# Prompt tokens at positions below this run in the fused native decode step (CPU, int8/int4), each
# as a one-token query over its own prefix: a short prompt then costs no second, op-by-op forward.
# Measured on 2 cores with SmolLM2 int4: a step of 4 decodes + a 40-token prompt 32 ms instead of
# 39-44 ms; a 512-token prompt unchanged at 64 (5-8% slower at 128).
FUSED_PROMPT_POSITIONS = 64

# (request, first position, token count, block ids, draft tokens after the request's own)
Piece = tuple[Request, int, int, list[int], list[int]]


@dataclass
class PromptLogprobSpan:
    """Rows row+skip .. row+n-1 of the batch give the logprobs of prompt positions first+skip+1 .. first+n."""

    request: Request
    first: int  # the chunk's first position
    skip: int  # positions already reported (a prompt recomputed after preemption)
    n: int  # positions of the chunk that have a next prompt token
    row: int  # the chunk's first row in the flat batch

    @property
    def rows(self) -> slice:
        return slice(self.row + self.skip, self.row + self.n)

    @property
    def num_rows(self) -> int:
        return self.n - self.skip


@dataclass
class NativeRoute:
    """Which tokens take the fused native step: every decode, and every prompt token at a position
    below FUSED_PROMPT_POSITIONS (each attends as a one-token query over its own prefix). The path
    depends only on the token, never on its batch or on how its prompt was chunked."""

    rows: torch.Tensor | None  # their rows of the flat batch; None: all of them, in order (decodes, verify steps)
    meta: AttentionMetadata  # one row per such token
    rest_rows: torch.Tensor | None  # the other rows, run op by op afterwards (they read the fused rows' K/V)
    rest: "FlatBatch | None"


@dataclass
class FlatBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


@dataclass
class ForwardBatch(FlatBatch):
    # sequences whose last token this step gives a new token, in row order; a request with a draft
    # once per verified position (its last token and each draft token), consecutively
    samplers: list[Request]
    sample_rows: list[int]  # the flat row of each entry of samplers
    prompt_spans: list[PromptLogprobSpan]
    decode_only: bool  # one new token per sequence
    native: NativeRoute | None = None  # set when the runner has the fused native step
    # with decode graphs: for a step of output tokens only that is not decode_only (a speculative verify,
    # tokens a grammar forced), the batch as one row per token over its own prefix, so the graphs run it
    one_token_rows: AttentionMetadata | None = None

    @property
    def logit_rows(self) -> list[int]:
        """Every row that needs logits, in order: the sampling rows, then each prompt-logprob span."""
        return self.sample_rows + [i for sp in self.prompt_spans for i in range(sp.rows.start, sp.rows.stop)]


def flatten(pieces: list[Piece], block_size: int, device: torch.device) -> FlatBatch:
    """One flat batch (no padding) of the given pieces, with each new token's cache slot."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qlens: list[int] = []
    slens: list[int] = []
    for r, start, n, blocks, spec in pieces:
        end = start + n
        ids.extend(r.all_token_ids[start:end])
        if end > r.num_tokens:  # speculative draft positions
            ids.extend(spec[max(start - r.num_tokens, 0) : end - r.num_tokens])
        positions.extend(range(start, end))
        # host lists, one tensor each: a step's small torch ops each cost ~50 us once the weights have
        # streamed through the caches
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        qlens.append(n)
        slens.append(end)
    width = max(len(p[3]) for p in pieces)
    block_tables = torch.tensor([p[3] + [0] * (width - len(p[3])) for p in pieces], dtype=torch.int32)
    meta = AttentionMetadata.flat(qlens, slens, torch.tensor(slots, dtype=torch.int64), block_tables, device)
    return FlatBatch(torch.tensor(ids, device=device), torch.tensor(positions, dtype=torch.int64, device=device), meta)


def _decoding(s: ScheduledRequest) -> bool:
    """The piece computes output tokens only (a decode, a verify's draft tokens, tokens a grammar forced)."""
    return bool(s.spec_token_ids) or s.start >= s.request.num_prompt_tokens


def _one_token_rows(batch: FlatBatch, scheduled: list[ScheduledRequest], starts: list[int],
                    firsts: list[tuple[int, int]]) -> tuple[torch.Tensor, AttentionMetadata]:
    """The batch rows of the first k tokens of each (sequence i, k) in `firsts` (`starts`: each sequence's
    first row), and their metadata as one-token queries, each over its own prefix: a row's attention is then
    a decode's, whatever else its sequence computes in the step. Built from host lists, two index tensors
    (a verify step's small torch ops cost ~50 us each once the weights have streamed through the caches)."""
    rows = [starts[i] + j for i, k in firsts for j in range(k)]
    seq_of_row = [i for i, k in firsts for _ in range(k)]
    seq_lens = [scheduled[i].start + j + 1 for i, k in firsts for j in range(k)]  # positions + 1, no device sync
    meta, device = batch.meta, batch.positions.device
    idx = torch.tensor(rows, device=device)
    assert meta.slot_mapping is not None and meta.block_tables is not None
    seqs = torch.tensor(seq_of_row, device=meta.block_tables.device)
    return idx, AttentionMetadata.flat([1] * len(rows), seq_lens, meta.slot_mapping[idx], meta.block_tables[seqs],
                                       device)


def build_forward_batch(scheduled: list[ScheduledRequest], block_size: int, device: torch.device,
                        native: bool = False, graphs: bool = False) -> ForwardBatch:
    flat = flatten([(s.request, s.start, s.num_new_tokens, s.block_ids, s.spec_token_ids) for s in scheduled],
                   block_size, device)
    rows = list(itertools.accumulate((s.num_new_tokens for s in scheduled), initial=0))
    samplers: list[Request] = []
    sample_rows: list[int] = []
    for i, s in enumerate(scheduled):
        m = s.num_sampled_rows
        samplers.extend([s.request] * m)
        sample_rows.extend(range(rows[i + 1] - m, rows[i + 1]))
    spans = []
    for i, s in enumerate(scheduled):
        r = s.request
        if r.params.prompt_logprobs is not None and s.start < r.num_prompt_tokens - 1:
            n = min(s.num_new_tokens, r.num_prompt_tokens - 1 - s.start)
            # after a preemption the prompt is recomputed: positions already reported are skipped
            skip = max(0, len(r.prompt_logprobs) - 1 - s.start)
            spans.append(PromptLogprobSpan(r, s.start, min(skip, n), n, rows[i]))
    batch = ForwardBatch(flat.input_ids, flat.positions, flat.meta, samplers, sample_rows, spans,
                         all(s.num_new_tokens == 1 for s in scheduled))
    if native:
        batch.native = _native_route(scheduled, batch, rows, block_size, device)
    if graphs and not batch.decode_only and all(_decoding(s) for s in scheduled):
        _, batch.one_token_rows = _one_token_rows(batch, scheduled, rows,
                                                  [(i, s.num_new_tokens) for i, s in enumerate(scheduled)])
    return batch


def _native_route(scheduled: list[ScheduledRequest], batch: ForwardBatch, starts: list[int], block_size: int,
                  device: torch.device) -> NativeRoute | None:
    fused: list[tuple[int, int]] = []  # (sequence, number of its first tokens that go fused)
    rest: list[Piece] = []
    rest_rows: list[torch.Tensor] = []
    for i, s in enumerate(scheduled):
        first, n = s.start, s.num_new_tokens
        # output tokens go fused, each over its own prefix (a verify step's, or the tokens a grammar forced
        # before the one sampled after them): every token's logits then come from the same computation as
        # a plain decode of it, so neither speculation nor jump-forward changes a greedy token
        k = n if n == 1 or _decoding(s) else max(0, min(n, FUSED_PROMPT_POSITIONS - first))
        if k:
            fused.append((i, k))
        if k < n:
            rest.append((s.request, first + k, n - k, s.block_ids, s.spec_token_ids))
            rest_rows.append(torch.arange(starts[i] + k, starts[i] + n))
    if not fused:
        return None
    if not rest and all(k == 1 for _, k in fused):  # decodes only: the batch is already one row per sequence
        return NativeRoute(None, batch.meta, None, None)
    rows, one = _one_token_rows(batch, scheduled, starts, fused)
    if not rest:  # every row fused, in order (a verify step): no gather and scatter of the rows
        return NativeRoute(None, one, None, None)
    return NativeRoute(rows, one, torch.cat(rest_rows), flatten(rest, block_size, device))


def prompt_logprob_entries(lp: torch.Tensor, span: PromptLogprobSpan) -> list[Logprob]:
    """Logprob entries of a span's positions (the token after each) from their log-softmax rows `lp`,
    with the request's top-k alternatives."""
    r = span.request
    k = r.params.prompt_logprobs
    res = []
    for j in range(span.skip, span.n):
        tok = r.prompt_token_ids[span.first + j + 1]
        row = lp[j - span.skip]
        top = []
        if k:
            v, ix = row.topk(k)
            top = list(zip(ix.tolist(), v.tolist()))
        res.append(Logprob(tok, float(row[tok]), top))
    return res
