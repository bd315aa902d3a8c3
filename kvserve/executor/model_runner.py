"""Model runner: SchedulerOutput -> ForwardBatch (built once) -> model -> sampled tokens."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kvserve.engine.request import Logprob
from kvserve.engine.scheduler import RunnerOutput, Scheduler, ScheduledRequest, SchedulerOutput
from kvserve.executor.forward_batch import ForwardBatch, build_forward_batch, prompt_logprob_entries
from kvserve.executor.native_decoder import NativeDecoder
from kvserve.layers.attention import allocate_kv_caches, attention_backend_of, copy_blocks
from kvserve.layers.sampler import Sampler

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_host_blocks: int = 0, decode_graphs: str = "off",
                 max_num_seqs: int = 256, max_model_len: int | None = None) -> None:
        """decode_graphs: "off", "cuda" (capture decode CUDA graphs) or "emulate" (their padded path, eager)."""
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.backend = attention_backend_of(model)
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

    @property
    def num_in_flight(self) -> int:
        """Batches submitted whose results are not back (a pipelined runner's; this one runs each at once)."""
        return 0

    def step(self, scheduler: Scheduler) -> tuple[SchedulerOutput, RunnerOutput]:
        """Schedule one batch and run it (a pipelined runner keeps several in flight instead)."""
        so = scheduler.schedule()
        return so, self.execute(so) if not so.is_empty else RunnerOutput()

    def swap(self, so: SchedulerOutput) -> None:
        """Run the step's block copies: device -> host first, then host -> device."""
        for pairs, src_caches, dst_caches in ((so.blocks_to_swap_out, self.kv_caches, self.host_caches),
                                              (so.blocks_to_swap_in, self.host_caches, self.kv_caches)):
            if pairs:
                copy_blocks(src_caches, dst_caches, pairs)

    def prepare(self, scheduled: list[ScheduledRequest]) -> ForwardBatch:
        return build_forward_batch(scheduled, self.block_size, self.device, native=self.native is not None,
                                   graphs=self.graphs is not None)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.swap(so)
        if not so.scheduled:
            return RunnerOutput()
        batch = self.prepare(so.scheduled)
        self.sampler.prefetch_masks(batch.samplers)  # grammar masks computed while the forward runs
        hidden = self.hidden_states(batch)
        logits = self.model.compute_logits(hidden[batch.sample_rows]) if batch.samplers else None
        prompt_logits = [self.model.compute_logits(hidden[sp.rows]).float() if sp.num_rows else None
                         for sp in batch.prompt_spans]
        return self.sample(batch, logits, prompt_logits)

    def hidden_states(self, batch: ForwardBatch) -> torch.Tensor:
        """Final-normed hidden states of every row of the batch, by the fastest path it allows (decode
        graphs, the fused native step, op by op); a draft model's proposer runs its forwards here too."""
        hidden = None
        if self.graphs is not None and batch.decode_only:
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        elif self.graphs is not None and batch.one_token_rows is not None:  # a verify step: a decode per token
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.one_token_rows)
        elif batch.native is not None:
            hidden = self._run_native(batch)
        elif self.native is not None and self.native.extends:  # prompt chunks past the fused positions only
            hidden = self.native.extend(batch.input_ids, batch.positions, batch.meta)
        if hidden is None:  # (a verify step past the largest graph: its one-token rows eagerly, still decodes)
            meta = batch.one_token_rows if batch.one_token_rows is not None else batch.meta
            hidden = self._model_forward(batch.input_ids, batch.positions, meta)
        return hidden

    def _model_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:  # noqa: ANN001
        if self.backend is not None:
            meta.plan = self.backend.prepare(meta)  # once for every layer
        return self.model(input_ids, positions, meta, self.kv_caches)

    def _run_native(self, batch: ForwardBatch) -> torch.Tensor:
        """The fused native step for the tokens the batch routes there; the others op by op after."""
        route, native = batch.native, self.native
        assert route is not None and native is not None
        if route.rows is None:
            return native.forward(batch.input_ids, batch.positions, route.meta)
        out = native.forward(batch.input_ids[route.rows], batch.positions[route.rows], route.meta)
        hidden = torch.empty(len(batch.input_ids), out.shape[1], device=self.device)
        hidden[route.rows] = out
        if route.rest is not None:  # after the fused call: these read its tokens' K/V from the cache
            rest = route.rest
            hidden[route.rest_rows] = (native.extend(rest.input_ids, rest.positions, rest.meta) if native.extends
                                       else self._model_forward(rest.input_ids, rest.positions, rest.meta))
        return hidden

    def sample(self, batch: ForwardBatch, logits: torch.Tensor | None,
               prompt_logits: list[torch.Tensor | None]) -> RunnerOutput:
        """Tokens from the sampling rows' logits; prompt logprobs from each span's (float32) logits."""
        out = RunnerOutput()
        if batch.samplers:
            assert logits is not None
            res = self.sampler(logits, batch.samplers)
            for r, tok, lp in zip(batch.samplers, res.token_ids, res.logprobs):  # a draft's rows come in order
                out.sampled.setdefault(r.request_id, []).append(tok)
                if lp is not None:
                    out.logprobs.setdefault(r.request_id, []).append(Logprob(tok, lp[0], lp[1]))
        for sp, lg in zip(batch.prompt_spans, prompt_logits):
            entries = prompt_logprob_entries(torch.log_softmax(lg, dim=-1), sp) if lg is not None else []
            out.prompt_logprobs[sp.request.request_id] = entries
        return out
