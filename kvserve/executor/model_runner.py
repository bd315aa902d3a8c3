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
        ids: list[int] = []
        positions: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        for s in scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            qlens.append(s.num_new_tokens)
            slens.append(end)
        width = max(len(s.block_ids) for s in scheduled)
        table = [s.block_ids + [0] * (width - len(s.block_ids)) for s in scheduled]
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
        """Single-token sequences through the fused native step; in a mixed step the others go op by
        op in a second forward. So a decode token takes the same path (and gets the same numbers)
        whatever else its step holds."""
        assert self.native is not None
        singles = [i for i, s in enumerate(scheduled) if s.num_new_tokens == 1]
        if not singles:
            return None
        if len(singles) == len(scheduled):
            return self.native.forward(batch.input_ids, batch.positions, batch.meta)
        starts = batch.meta.query_start_loc.tolist()
        rest = [i for i in range(len(scheduled)) if scheduled[i].num_new_tokens != 1]
        hidden = torch.empty(len(batch.input_ids), self.model.config.hidden_size, device=self.device)
        one = self.prepare([scheduled[i] for i in singles])
        hidden[[starts[i] for i in singles]] = self.native.forward(one.input_ids, one.positions, one.meta)
        many = self.prepare([scheduled[i] for i in rest])
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in rest])
        hidden[rows] = self.model(many.input_ids, many.positions, many.meta, self.kv_caches)
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
