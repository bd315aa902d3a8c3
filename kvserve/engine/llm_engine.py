"""LLMEngine: step() = schedule -> execute -> update -> outputs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from kvserve.config import EngineConfig
from kvserve.engine.cpu_threads import ThreadGovernor
from kvserve.engine.input_processor import InputProcessor
from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.outputs import RequestOutput
from kvserve.engine.policy import make_policy
from kvserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvserve.errors import InvalidRequestError
from kvserve.executor.memory import kv_bytes_per_token, plan_memory
from kvserve.executor.model_runner import ModelRunner
from kvserve.kernels.cpu.build import cpu_has_fast_bf16
from kvserve.layers.attention import make_attention_backend, resolve_kv_dtype, set_attention_backend
from kvserve.loader import LoadedModel, load_model
from kvserve.platform import tune_allocator
from kvserve.sampling_params import SamplingParams
from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.adaptive import DraftLengthController
from kvserve.spec_decode.proposer import BatchProposer

logger = logging.getLogger(__name__)

StepObserver = Callable[[SchedulerOutput, float], None]  # (the step's batch, seconds the step took)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None, **kwargs: object) -> None:
        self.config = c = (config if config is not None else EngineConfig.from_kwargs(**kwargs)).resolve()
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        self.device = torch.device(c.device)
        self.executor = None  # MultiProcExecutor when the model is split across processes
        pcfg = c.parallel_config()
        pcfg.validate()
        if pcfg.world_size > 1:
            from kvserve.distributed.executor import start_parallel

            self.executor, self.lm = start_parallel(c, loaded, self.device)
        else:
            self.lm = loaded or load_model(c.model, dtype=c.dtype, device=self.device, quantization=c.quantization)
        if self.device.type == "cpu":  # after the load, which wants freed buffers returned at once
            tune_allocator()
        try:  # from here on a failure must not leave parallel workers behind
            self._build()
        except BaseException:
            self.shutdown()
            raise
        self.output_processor = OutputProcessor()
        # CPU threads follow the cores other processes leave free, unless the user fixed them (cpu_threads.py)
        gov = (ThreadGovernor(torch.get_num_threads())
               if self.device.type == "cpu" and self.executor is None and not c.num_threads
               and os.environ.get("KVSERVE_CPU_THREAD_GOVERNOR", "1") != "0" else None)
        self.thread_governor = gov if gov is not None and gov.active else None
        self.step_observers: list[StepObserver] = []  # e.g. the simulator's calibration
        self._counter = 0

    def _build(self) -> None:
        c, mcfg, model = self.config, self.lm.config, self.lm.model
        self.tokenizer = self.lm.tokenizer
        backend = set_attention_backend(model, make_attention_backend(c.attention_backend, self.device))
        self.max_model_len = min(c.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.kv_dtype = self._kv_dtype(self.lm)
        if self.device.type == "cpu" and torch.bfloat16 in (self.lm.dtype, self.kv_dtype) and not cpu_has_fast_bf16():
            logger.warning("bfloat16 %s on a CPU without native bfloat16 (no AVX512-BF16 / ARM BF16): torch's bf16 "
                           "kernels run far slower than float32 here", "weights" if self.lm.dtype == torch.bfloat16
                           else "KV cache")
        spec = c.speculative_config
        draft = None  # a draft model (speculative draft_model / self_quant): its own weights and KV cache
        draft_kv_dtype, draft_per_token = self.kv_dtype, 0
        if spec is not None and spec.method != "ngram":
            from kvserve.spec_decode.draft_model import load_draft

            draft = load_draft(spec, self.lm, self.device)
            set_attention_backend(draft.model, make_attention_backend(c.attention_backend, self.device))
            draft_kv_dtype = self._kv_dtype(draft)
            draft_per_token = kv_bytes_per_token(draft.model, draft_kv_dtype)
        self.budget = plan_memory(c, model, self.lm.weight_bytes + (draft.weight_bytes if draft else 0), self.kv_dtype,
                                  self.max_model_len, self.device, profile=self.executor is None,
                                  draft_bytes_per_token=draft_per_token)
        logger.info("%s", self.budget.describe())
        num_host_blocks = 0
        if c.preemption_mode != "recompute":
            num_host_blocks = int(c.swap_space) // (self.budget.kv_bytes_per_token * c.block_size)
        # a CPU cache commits pages as blocks are first written: bound what cached prefixes keep resident
        retain = None if self.device.type != "cpu" else int(c.prefix_cache_memory) // (
            (self.budget.kv_bytes_per_token + draft_per_token) * c.block_size)
        self.kv = KVCacheManager(self.budget.num_blocks, c.block_size, c.enable_prefix_caching, num_host_blocks,
                                 retain)
        self.scheduler = Scheduler(
            SchedulerConfig(c.max_num_seqs, c.max_num_batched_tokens, self.max_model_len, c.preemption_mode), self.kv,
            make_policy(c.scheduling_policy, c.scheduling_max_wait),
        )
        self.scheduler.jump_forward = c.structured_outputs_jump_forward
        if spec is not None:
            if draft is None:
                self.scheduler.proposer = make_proposer(spec)
            else:
                from kvserve.spec_decode.draft_model import DraftModelProposer

                self.scheduler.proposer = DraftModelProposer(
                    draft, spec.num_speculative_tokens, self.budget.num_blocks, c.block_size, draft_kv_dtype,
                    self.device, vocab_size=mcfg.vocab_size, max_catch_up_tokens=c.max_num_batched_tokens,
                    max_model_len=self.max_model_len, enable_prefix_caching=c.enable_prefix_caching,
                    retain_blocks=retain, max_num_seqs=c.max_num_seqs)
            if spec.adaptive:
                control = self.scheduler.draft_control = DraftLengthController()
                if draft is not None:  # until a draft forward is timed: the target's time for its rows, scaled by
                    # the weight bytes (few-row steps stream the weights), so a first draft is not taken for free
                    ratio = draft.weight_bytes / self.lm.weight_bytes
                    # (every step's times: a draft's first forwards are prompt catch-ups, which the one-token
                    # rows' curve, extrapolated in proportion, priced at several times their cost: never tried)
                    self.scheduler.proposer.draft_time.prior = lambda n: control.any_step_time.estimate(n) * ratio
            logger.info("speculative decoding: %s", spec)
        self.input_processor = InputProcessor(self.tokenizer, mcfg.vocab_size, self.max_model_len, self.kv)
        if self.executor is not None:
            self.runner = self.executor.make_runner(self.lm, self.budget.num_blocks, c.block_size, self.kv_dtype,
                                                    num_host_blocks, c.max_num_seqs, self.max_model_len)
        else:
            graphs = self.device.type == "cuda" and not c.enforce_eager and backend.name == "triton"
            self.runner = ModelRunner(model, self.budget.num_blocks, c.block_size, self.kv_dtype, self.device,
                                      num_host_blocks, "cuda" if graphs else "off", c.max_num_seqs, self.max_model_len)

    def _kv_dtype(self, lm: LoadedModel) -> torch.dtype:
        """The KV cache dtype of a model (the target, or a draft model) under this config."""
        c = self.config
        kv_dtype = resolve_kv_dtype(c.kv_cache_dtype, lm.dtype)
        if c.kv_cache_dtype == "auto" and self.device.type == "cpu" and lm.quantization != "none" \
                and lm.dtype == torch.float32:
            # the quantized CPU path reads the cache through the native kernels, which convert float16
            # on every ISA: half the memory and bandwidth of float32, llama.cpp's default too
            kv_dtype = torch.float16
            logger.info("kv cache auto -> float16: %s weights on the native CPU path (--kv-cache-dtype float32 "
                        "keeps full precision)", lm.quantization)
        return kv_dtype

    # -- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises InvalidRequestError and leaves the engine untouched."""
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self.output_processor:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        parent = self.input_processor.process(request_id, prompt, params or SamplingParams(), arrival_time)
        self.output_processor.add(parent)
        for r in parent.children:
            self.scheduler.add(r)
        return request_id

    def abort_request(self, request_id: str) -> None:
        parent = self.output_processor.parents.get(request_id)
        if parent is None:
            return
        for r in parent.children:
            self.scheduler.finish(r, "abort")
        self.output_processor.aborted(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs, waits, or has a final output (e.g. after abort) not yet returned."""
        return self.scheduler.has_unfinished() or len(self.output_processor) > 0 or self.runner.num_in_flight > 0

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.thread_governor is not None:
            self._follow_free_cores(self.thread_governor)
        timed = self.step_observers or self.scheduler.draft_control is not None
        t0 = time.perf_counter() if timed else 0.0
        so, result = self.runner.step(self.scheduler)  # schedule + execute (pipelined: the oldest micro-batch back)
        if self.scheduler.draft_control is not None:  # adaptive draft lengths learn what a step costs
            proposer = self.scheduler.proposer  # a draft model's forwards ran in the schedule: timed apart
            drafting = proposer.take_seconds() if isinstance(proposer, BatchProposer) else 0.0
            # steps of one-token rows only (decodes and their drafts): what a draft position costs is a row's
            # cost, and a prompt's tokens cost less (larger GEMM tiles, short attention): a line drawn from 16
            # decode rows (23.4 ms) to a 160-token prefill step (96.8 ms) priced a row at 0.6 ms, not 0.9-2.6
            control, secs = self.scheduler.draft_control, time.perf_counter() - t0 - drafting
            control.any_step_time.observe(so.total_num_tokens, secs)
            if all(s.num_new_tokens - len(s.spec_token_ids) == 1 for s in so.scheduled):
                control.step_time.observe(so.total_num_tokens, secs)
        self.scheduler.update_from_output(so, result)  # tokens, stops, freed blocks: the one post-step update
        outputs = self.output_processor.process(so)
        if self.step_observers:
            dt = time.perf_counter() - t0
            for observe in self.step_observers:
                observe(so, dt)
        return outputs

    @staticmethod
    def _follow_free_cores(gov: ThreadGovernor) -> None:
        n = gov.tick()
        if n is not None:
            logger.info("CPU threads -> %d: other processes use %.1f of this engine's %d cores (--num-threads fixes "
                        "the count)", n, gov.others, len(gov.cpus))
            torch.set_num_threads(n)

    # -- state --------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        pool = self.kv.pool
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": self.kv.usage(),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_swaps": self.scheduler.num_swaps,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "blocks_free": pool.num_free_blocks - pool.num_cached_blocks,
            "blocks_cached": pool.num_cached_blocks,
            "blocks_used": pool.num_used_blocks,
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else 0,
            "kv_internal_waste_perc": self.kv.internal_waste(
                {r.request_id: r.num_computed_tokens for r in self.scheduler.running}),
            **self.scheduler.spec_stats.as_dict(),  # zeros without speculative decoding
        }

    def pipeline_stats(self) -> dict[str, float]:
        """Pipeline occupancy (see ParallelRunner.pipeline_stats); zeros without pipelining."""
        stats = getattr(self.runner, "pipeline_stats", None)
        return stats() if stats is not None else {"pipeline_in_flight_mean": 0.0, "pipeline_bubble": 0.0}

    def check_health(self) -> None:
        """Raise if a parallel worker has died (the server's /health turns 503)."""
        if self.executor is not None:
            self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the parallel workers, if any; the engine is unusable afterwards."""
        if self.executor is not None:
            self.executor.shutdown()
