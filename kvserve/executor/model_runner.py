"""Model runner: SchedulerOutput -> one flat token batch -> model -> sampled tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from kvserve.engine.request import Logprob, Request
from kvserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvserve.executor.cpu import NativeDecoder
from kvserve.executor.reference import allocate_kv_caches, copy_blocks
from kvserve.layers.attention import AttentionMetadata
from kvserve.layers.sampler import Sampler

logger = logging.getLogger(__name__)

# Prompt tokens at positions below this run in the fused native decode step (CPU, int8/int4), each
# as a one-token query over its own prefix: a short prompt then costs no second, op-by-op forward.
# Measured on 2 cores with SmolLM2 int4: a step of 4 decodes + a 40-token prompt 32 ms instead of
# 39-44 ms; a 512-token prompt unchanged at 64 (5-8% slower at 128).
FUSED_PROMPT_POSITIONS = 64


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, Logprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)  # this step's chunk


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_index: torch.Tensor  # [B] index of each sequence's last token in the flat batch


def prompt_logprob_entries(lp: torch.Tensor, r: Request, first: int, skip: int, n: int) -> list[Logprob]:
    """Logprob entries of prompt positions first+skip .. first+n-1 (the token after each) from their
    log-softmax rows `lp`, with the request's top-k alternatives."""
    k = r.params.prompt_logprobs
    res = []
    for j in range(skip, n):
        tok = r.prompt_token_ids[first + j + 1]
        row = lp[j - skip]
        top = []
        if k:
            v, ix = row.topk(k)
            top = list(zip(ix.tolist(), v.tolist()))
        res.append(Logprob(tok, float(row[tok]), top))
    return res


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_host_blocks: int = 0, decode_graphs: str = "off",
                 max_num_seqs: int = 256, max_model_len: int | None = None) -> None:
        """decode_graphs: "off", "cuda" (capture decode CUDA graphs) or "emulate" (their padded path, eager)."""
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # decode graphs pad batches into one extra scratch block past the manager's num_blocks
        extra = 0 if decode_graphs == "off" else 1
        self.kv_caches = allocate_kv_caches(model, num_blocks + extra, block_size, kv_dtype, self.device)
        self.host_caches = allocate_kv_caches(model, num_host_blocks, block_size, kv_dtype, "cpu",
                                              pin_memory=self.device.type == "cuda") if num_host_blocks else []
        self.sampler = Sampler()
        self.native = NativeDecoder(model, self.kv_caches) if NativeDecoder.supports(model, self.kv_caches) else None
        self.graphs = None
        if decode_graphs != "off":
            from kvserve.executor.cuda_graph import DecodeGraphRunner

            max_len = max_model_len or model.config.max_position_embeddings
            try:
                self.graphs = DecodeGraphRunner(model, self.kv_caches, block_size, num_blocks, max_num_seqs, max_len,
                                                self.device, mode=decode_graphs)
            except Exception:  # noqa: BLE001 - a capture failure costs speed, never the service
                logger.exception("decode graph capture failed; running decode steps eagerly")

    def swap(self, so: SchedulerOutput) -> None:
        """Run the step's block copies: device -> host first, then host -> device."""
        for pairs, src_caches, dst_caches in ((so.blocks_to_swap_out, self.kv_caches, self.host_caches),
                                              (so.blocks_to_swap_in, self.host_caches, self.kv_caches)):
            if pairs:
                copy_blocks(src_caches, dst_caches, pairs)

    def prepare(self, scheduled: list[ScheduledRequest]) -> ForwardBatch:
        return self._prepare([(s.request, s.request.num_computed_tokens, s.num_new_tokens, s.block_ids)
                              for s in scheduled])

    def _prepare(self, pieces: list[tuple[Request, int, int, list[int]]]) -> ForwardBatch:
        """A flat batch of (request, first position, token count, block ids) pieces."""
        ids: list[int] = []
        positions: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        for r, start, n, _ in pieces:
            end = start + n
            ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            qlens.append(n)
            slens.append(end)
        width = max(len(p[3]) for p in pieces)
        table = [p[3] + [0] * (width - len(p[3])) for p in pieces]
        dev = self.device
        block_tables = torch.tensor(table, dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int64)
        q = torch.tensor(qlens, dtype=torch.int64)
        seq_of_token = torch.repeat_interleave(torch.arange(len(qlens)), q)
        slots = block_tables[seq_of_token, pos // self.block_size].long() * self.block_size + pos % self.block_size
        qsl = torch.zeros(len(qlens) + 1, dtype=torch.int32)
        qsl[1:] = q.cumsum(0)
        meta = AttentionMetadata(
            query_start_loc=qsl.to(dev),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            slot_mapping=slots.to(dev),
            block_tables=block_tables.to(dev),
        )
        return ForwardBatch(torch.tensor(ids, device=dev), pos.to(dev), meta, (qsl[1:] - 1).long().to(dev))

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.swap(so)
        if not so.scheduled:
            return RunnerOutput()
        batch = self.prepare(so.scheduled)
        hidden = None
        if self.graphs is not None and all(s.num_new_tokens == 1 for s in so.scheduled):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        elif self.native is not None:
            hidden = self._run_native(so.scheduled, batch)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches)
        out = RunnerOutput()
        rows = [i for i, s in enumerate(so.scheduled) if s.samples]
        if rows:
            reqs = [so.scheduled[i].request for i in rows]
            logits = self.model.compute_logits(hidden[batch.last_index[rows]])
            res = self.sampler(logits, reqs)
            for r, tok, lp in zip(reqs, res.token_ids, res.logprobs):
                out.sampled[r.request_id] = tok
                if lp is not None:
                    out.logprobs[r.request_id] = Logprob(tok, lp[0], lp[1])
        start = 0
        for s in so.scheduled:
            r = s.request
            if r.params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens - 1:
                out.prompt_logprobs[r.request_id] = self._prompt_logprobs(hidden[start : start + s.num_new_tokens], s)
            start += s.num_new_tokens
        return out

    def _run_native(self, scheduled: list[ScheduledRequest], batch: ForwardBatch) -> torch.Tensor | None:
        """The fused native step for every decode token and every prompt token at a position below
        FUSED_PROMPT_POSITIONS (each attends as a one-token query over its own prefix); the other
        prompt tokens go op by op in a second forward. Which path a token takes depends only on
        the token itself, never on its batch or on how its prompt was chunked, so it gets the same
        numbers either way."""
        assert self.native is not None
        fused: list[tuple[int, int]] = []  # (sequence, number of its first tokens that go fused)
        rest: list[tuple[Request, int, int, list[int]]] = []  # pieces for the op-by-op forward
        starts: list[int] = []  # each sequence's first row in the flat batch
        rest_rows: list[torch.Tensor] = []
        row = 0
        for i, s in enumerate(scheduled):
            first, n = s.request.num_computed_tokens, s.num_new_tokens
            starts.append(row)
            k = n if n == 1 else max(0, min(n, FUSED_PROMPT_POSITIONS - first))
            if k:
                fused.append((i, k))
            if k < n:
                rest.append((s.request, first + k, n - k, s.block_ids))
                rest_rows.append(torch.arange(row + k, row + n))
            row += n
        if not fused:
            return None
        meta = batch.meta
        if not rest and all(k == 1 for _, k in fused):  # decodes only: the batch is already one row per sequence
            return self.native.forward(batch.input_ids, batch.positions, meta)
        rows = torch.cat([torch.arange(starts[i], starts[i] + k) for i, k in fused])
        seq_of_row = torch.repeat_interleave(torch.tensor([i for i, _ in fused]), torch.tensor([k for _, k in fused]))
        positions = batch.positions[rows]
        one = AttentionMetadata(  # one row per token: its own prefix is its context
            query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
            seq_lens=(positions + 1).to(torch.int32),
            query_lens_cpu=[1] * len(rows),
            seq_lens_cpu=(positions + 1).tolist(),
            slot_mapping=meta.slot_mapping[rows],
            block_tables=meta.block_tables[seq_of_row],
        )
        out = self.native.forward(batch.input_ids[rows], positions, one)
        hidden = torch.empty(len(batch.input_ids), out.shape[1], device=self.device)
        hidden[rows] = out
        if not rest:
            return hidden
        many = self._prepare(rest)  # after the fused call: these read its tokens' K/V from the cache
        hidden[torch.cat(rest_rows)] = self.model(many.input_ids, many.positions, many.meta, self.kv_caches)
        return hidden

    def _prompt_logprobs(self, hidden: torch.Tensor, s: ScheduledRequest) -> list[Logprob]:
        """Logprob of each next prompt token, from the logits at this chunk's positions."""
        r = s.request
        first = r.num_computed_tokens
        n = min(s.num_new_tokens, r.num_prompt_tokens - 1 - first)
        # after a preemption the prompt is recomputed: positions already reported are skipped
        skip = max(0, len(r.prompt_logprobs) - 1 - first)
        if skip >= n:
            return []
        lp = torch.log_softmax(self.model.compute_logits(hidden[skip:n]).float(), dim=-1)
        return prompt_logprob_entries(lp, r, first, skip, n)
