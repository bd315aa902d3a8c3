"""LLMEngine: step() = schedule, execute, update, detokenize."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from kvserve.config import EngineConfig, parse_bytes
from kvserve.distributed.parallel_state import ParallelConfig
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.engine.policy import make_policy
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvserve.errors import InvalidRequestError
from kvserve.executor.cpu import tune_allocator
from kvserve.executor.model_runner import ModelRunner, RunnerOutput
from kvserve.layers.attention import (
    AttentionMetadata,
    KVCache,
    make_attention_backend,
    resolve_kv_dtype,
    set_attention_backend,
)
from kvserve.loader import LoadedModel, load_model
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class MemoryBudget:
    weights: int
    activations: int | None  # measured peak of one full-budget forward; None when not profiled
    kv_cache: int
    kv_bytes_per_token: int
    num_blocks: int
    block_size: int
    max_model_len: int
    kv_dtype: str = "float32"

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        return self.kv_tokens / self.max_model_len

    def describe(self) -> str:
        mib = 2**20
        act = "not measured" if self.activations is None else f"{self.activations / mib:.0f} MiB"
        return (
            f"memory: weights {self.weights / mib:.0f} MiB, activations {act}, KV cache ({self.kv_dtype}) "
            f"{self.kv_cache / mib:.0f} MiB "
            f"= {self.num_blocks} blocks x {self.block_size} tokens = {self.kv_tokens} tokens "
            f"({self.kv_bytes_per_token / 1024:.1f} KiB/token); max concurrency at max_model_len={self.max_model_len}: "
            f"{self.max_concurrency:.2f} sequences"
        )


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Group:
    """The n samples of one request, reported together."""

    def __init__(self, request_id: str, prompt: str | None, children: list[Request],
                 detoks: list[IncrementalDetokenizer]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.children = children
        self.detoks = detoks
        self.sent_text = [0] * len(children)
        self.sent_tokens = [0] * len(children)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None, **kwargs: object) -> None:
        if config is None:
            names = {f.name for f in dataclasses.fields(EngineConfig)}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise InvalidRequestError(f"unknown engine argument(s): {', '.join(unknown)}")
            config = EngineConfig(**kwargs)  # type: ignore[arg-type]
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.executor = None  # MultiProcExecutor when the model is split across processes
        pcfg = config.parallel_config()
        pcfg.validate()
        if pcfg.world_size > 1:
            self.lm = self._start_parallel(pcfg, loaded, dtype)
        else:
            self.lm = loaded or load_model(config.model, dtype=dtype, device=self.device,
                                            quantization=config.quantization)
        if self.device.type == "cpu":  # after the load, which wants freed buffers returned at once
            tune_allocator()
        try:  # from here on a failure must not leave parallel workers behind
            self.tokenizer = self.lm.tokenizer
            backend = set_attention_backend(self.lm.model, make_attention_backend(config.attention_backend, self.device))
            mcfg = self.lm.config
            self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
            if config.block_size < 1 or config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
                raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
            self.budget = self._plan_memory()
            logger.info("%s", self.budget.describe())
            if config.preemption_mode not in ("recompute", "swap", "auto"):
                raise InvalidRequestError(f"preemption_mode must be recompute, swap or auto, got {config.preemption_mode!r}")
            num_host_blocks = 0
            if config.preemption_mode != "recompute":
                try:
                    num_host_blocks = parse_bytes(config.swap_space) // (self.budget.kv_bytes_per_token * config.block_size)
                except ValueError:
                    raise InvalidRequestError(f"swap_space: cannot parse {config.swap_space!r}") from None
            self.kv = KVCacheManager(self.budget.num_blocks, config.block_size, config.enable_prefix_caching,
                                     num_host_blocks)
            self.scheduler = Scheduler(
                SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                config.preemption_mode), self.kv,
                make_policy(config.scheduling_policy, config.scheduling_max_wait),
            )
            graphs = self.device.type == "cuda" and not config.enforce_eager and getattr(backend, "name", "") == "triton"
            if self.executor is not None:
                self.runner = self.executor.make_runner(self.lm, self.budget.num_blocks, config.block_size, self.kv_dtype,
                                                        num_host_blocks, config.max_num_seqs, self.max_model_len)
            else:
                self.runner = ModelRunner(self.lm.model, self.budget.num_blocks, config.block_size, self.kv_dtype,
                                          self.device, num_host_blocks, "cuda" if graphs else "off", config.max_num_seqs,
                                          self.max_model_len)
        except BaseException:
            self.shutdown()
            raise
        # pipeline parallelism: up to this many micro-batches in flight (engine/pipeline in step())
        self.pipeline_depth = pcfg.pipeline_parallel_size
        self._in_flight: deque = deque()
        self._pipe_samples = 0  # micro-batches collected, and the in-flight count summed at each
        self._pipe_depth_sum = 0
        self.groups: dict[str, _Group] = {}
        self._child_group: dict[str, _Group] = {}
        self._aborted: set[str] = set()
        self._counter = 0

    # -- parallel -----------------------------------------------------------------------

    def _start_parallel(self, pcfg: ParallelConfig, loaded: LoadedModel | None, dtype: str) -> LoadedModel:
        """Spawn the workers, then load rank 0's shard here while they load theirs (a `loaded` model only
        names the checkpoint: every rank, this one included, reads its own slice of it)."""
        from kvserve.distributed.executor import MultiProcExecutor
        from kvserve.loader import default_model_path
        from kvserve.loader.gguf import GGUFFile
        from kvserve.loader.hf import HFModelDir

        c = self.config
        path = Path(loaded.path if loaded is not None else (default_model_path() if c.model is None else c.model))
        src = HFModelDir(path) if path.is_dir() else GGUFFile(path)
        mcfg = src.model_config()
        pcfg.validate(mcfg.num_heads, mcfg.num_kv_heads, mcfg.num_layers, mcfg.architecture)
        quant = loaded.quantization if loaded is not None else c.quantization
        self.executor = MultiProcExecutor(pcfg, self.device, c.num_threads)
        try:
            return self.executor.load(dict(model=str(path), dtype=str(loaded.dtype).removeprefix("torch.")
                                           if loaded is not None else dtype, quantization=quant,
                                           attention_backend=c.attention_backend))
        except BaseException:
            self.executor.shutdown(graceful=False)
            raise

    def check_health(self) -> None:
        """Raise if a parallel worker has died (the server's /health turns 503)."""
        if self.executor is not None:
            self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the parallel workers, if any; the engine is unusable afterwards."""
        if self.executor is not None:
            self.executor.shutdown()

    def pipeline_stats(self) -> dict[str, float]:
        """Pipeline occupancy: mean micro-batches in flight when one is collected, and the bubble
        (1 - mean / pipeline_parallel_size: the share of stage slots left idle)."""
        mean = self._pipe_depth_sum / self._pipe_samples if self._pipe_samples else 0.0
        return {"pipeline_in_flight_mean": mean,
                "pipeline_bubble": 1.0 - mean / self.pipeline_depth if self._pipe_samples else 0.0}

    # -- memory -------------------------------------------------------------------------

    def _plan_memory(self) -> MemoryBudget:
        c, m = self.config, self.lm.config
        self.kv_dtype = resolve_kv_dtype(c.kv_cache_dtype, self.lm.dtype)
        # a rank holds its KV heads of its layers; rank 0 (stage 0) holds the most layers
        per_token = getattr(self.lm.model, "num_local_layers", m.num_layers) * KVCache.bytes_per_token(
            getattr(self.lm.model, "num_local_kv_heads", m.num_kv_heads), m.head_dim, self.kv_dtype)
        activations = None
        if c.kv_cache_memory is not None:
            try:
                kv_bytes = parse_bytes(c.kv_cache_memory)
            except ValueError:
                raise InvalidRequestError(f"kv_cache_memory: cannot parse {c.kv_cache_memory!r}") from None
        else:
            # a parallel forward needs every rank: not profiled, the share of free memory is the budget
            activations = self._profile_activations() if self.executor is None else 0
            if self.device.type == "cuda":
                total = torch.cuda.mem_get_info(self.device)[1]
                kv_bytes = int(total * c.gpu_memory_utilization) - torch.cuda.memory_allocated(self.device) - activations
            else:
                kv_bytes = int(_available_memory(self.device) * c.cpu_memory_utilization) - activations
            # more than every seat filled to max_model_len is never needed
            kv_bytes = min(kv_bytes, per_token * c.max_num_seqs * self.max_model_len)
        num_blocks = kv_bytes // (per_token * c.block_size)
        if num_blocks < 1:
            raise InvalidRequestError(
                f"KV cache budget of {kv_bytes} bytes holds no block of {c.block_size} tokens "
                f"({per_token * c.block_size} bytes); raise kv_cache_memory"
            )
        return MemoryBudget(self.lm.weight_bytes, activations, num_blocks * per_token * c.block_size, per_token,
                            num_blocks, c.block_size, self.max_model_len,
                            str(self.kv_dtype).removeprefix("torch."))

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak extra memory of one forward over a full token budget (one long sequence)."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        meta = AttentionMetadata.for_prefill([n], self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            h = self.lm.model(ids, pos, meta)
            self.lm.model.compute_logits(h[-1:])
            return torch.cuda.max_memory_allocated(self.device) - base
        before = _peak_rss()
        h = self.lm.model(ids, pos, meta)
        self.lm.model.compute_logits(h[-1:])
        # ru_maxrss only grows: this is a lower bound when an earlier peak was higher.
        return max(_peak_rss() - before, 0)

    # -- requests -----------------------------------------------------------------------

    def _validate_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("a prompt is a string or a list of token ids")
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.lm.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of vocabulary (size {vocab})")
        return None, list(prompt)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises InvalidRequestError and leaves the engine untouched."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self._validate_prompt(prompt)
        n_prompt = len(ids)
        if params.max_tokens is not None and n_prompt + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {n_prompt + params.max_tokens} "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        if n_prompt >= self.max_model_len:
            raise InvalidRequestError(f"prompt ({n_prompt} tokens) leaves no room under max_model_len ({self.max_model_len})")
        capacity = self.kv.num_blocks * self.kv.block_size
        # no max_tokens: generate up to the context limit, or what the whole cache can hold
        limit = self.max_model_len if params.max_tokens is not None else min(self.max_model_len, capacity)
        total = n_prompt + params.max_tokens if params.max_tokens is not None else limit
        if self.kv.blocks_needed(total) > self.kv.num_blocks or n_prompt >= limit:
            raise InvalidRequestError(
                f"request needs up to {total} tokens of KV cache but the whole cache holds "
                f"{self.kv.num_blocks * self.kv.block_size}; lower max_tokens or raise kv_cache_memory"
            )
        eos = self.tokenizer.eos_token_ids
        children, detoks = [], []
        for i in range(params.n):
            p = params if params.n == 1 else params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            r = Request(child_id, ids, p, eos, limit, arrival_time, group_id=request_id)
            if i > 0:
                r.wait_for = children[0]
            children.append(r)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens, p.stop,
                                                 p.include_stop_str_in_output))
        group = _Group(request_id, text, children, detoks)
        self.groups[request_id] = group
        for r in children:
            self._child_group[r.request_id] = group
            self.scheduler.add(r)
        return request_id

    def abort_request(self, request_id: str) -> None:
        group = self.groups.get(request_id)
        if group is None:
            return
        for r in group.children:
            self.scheduler.finish(r, "abort")
        self._aborted.add(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs, waits, or has a final output (e.g. after abort) not yet returned."""
        return self.scheduler.has_unfinished() or bool(self.groups) or bool(self._in_flight)

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        touched: dict[str, _Group] = {}
        if self.pipeline_depth > 1:
            self._step_pipelined(touched)
        else:
            so = self.scheduler.schedule()
            if not so.is_empty:
                ro = self.runner.execute(so)
                self.scheduler.update(so)
                self._apply(so, ro, touched)
        # groups finished by abort since the last step also report
        for gid in self._aborted:
            group = self.groups.get(gid)
            if group is not None and group.finished:
                touched[gid] = group
        self._aborted.clear()
        outputs = [self._make_output(g) for g in touched.values()]
        for o in outputs:
            if o.finished:
                group = self.groups.pop(o.request_id)
                for r in group.children:
                    self._child_group.pop(r.request_id, None)
        return outputs

    def _step_pipelined(self, touched: dict[str, _Group]) -> None:
        """Submit micro-batches until `pipeline_depth` are in flight, then collect the oldest.

        A request is in at most one micro-batch at a time (the scheduler skips `busy` ones: its
        next tokens depend on this batch's result). One whose batch comes back after it was
        preempted or aborted meanwhile has its result dropped; its K/V writes are harmless, since
        every stage runs micro-batches in submission order.
        """
        sched = self.scheduler
        busy = sched.busy
        # split the work into pipeline_depth micro-batches, so that every stage has one to run
        sched.max_batch_seqs = max(1, -(-(len(sched.running) + len(sched.waiting)) // self.pipeline_depth))
        while len(self._in_flight) < self.pipeline_depth:
            so = sched.schedule()
            if so.is_empty:
                break
            marks = [(s.request, s.request.num_preemptions) for s in so.scheduled]
            busy.update(s.request.request_id for s in so.scheduled)
            self._in_flight.append((self.runner.submit(so), marks))
        if not self._in_flight:
            return
        self._pipe_samples += 1
        self._pipe_depth_sum += len(self._in_flight)
        pending, marks = self._in_flight.popleft()
        ro = self.runner.collect(pending)
        so = pending.so
        busy.difference_update(s.request.request_id for s in so.scheduled)
        so.scheduled = [s for s, (r, n) in zip(so.scheduled, marks)
                        if r.status == RequestStatus.RUNNING and r.num_preemptions == n]
        self.scheduler.update(so)
        self._apply(so, ro, touched)

    def _apply(self, so: SchedulerOutput, ro: RunnerOutput, touched: dict[str, _Group]) -> None:
        """Append a step's tokens and logprobs to its requests and finish those that stop."""
        now = time.time()
        for s in so.scheduled:
            r = s.request
            group = self._child_group[r.request_id]
            if r.request_id in ro.prompt_logprobs:
                if not r.prompt_logprobs:
                    r.prompt_logprobs.append(None)  # the first prompt token has no logprob
                r.prompt_logprobs.extend(ro.prompt_logprobs[r.request_id])
            tok = ro.sampled.get(r.request_id)
            if tok is None:
                continue
            touched[group.request_id] = group
            r.append_token(tok)
            if r.first_token_time is None:
                r.first_token_time = now
            if r.request_id in ro.logprobs:
                r.logprobs.append(ro.logprobs[r.request_id])
            detok = group.detoks[group.children.index(r)]
            stop_str = detok.add(tok)
            reason = r.check_stop()
            if stop_str is not None:
                r.stop_reason, reason = stop_str, "stop"
            if reason is not None:
                if stop_str is None:
                    detok.flush()
                self.scheduler.finish(r, reason)

    def _make_output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, (r, d) in enumerate(zip(g.children, g.detoks)):
            text = d.visible_text(r.is_finished)
            lps = r.logprobs if r.params.logprobs is not None else None
            outs.append(CompletionOutput(
                index=i,
                text=text,
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                logprobs=lps,
                cumulative_logprob=sum(lp.logprob for lp in lps) if lps else None,
                delta_text=text[g.sent_text[i]:],
                delta_token_ids=r.output_token_ids[g.sent_tokens[i]:],
            ))
            g.sent_text[i], g.sent_tokens[i] = len(text), len(r.output_token_ids)
        first = g.children[0]
        finish_times = [r.finish_time for r in g.children]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=min((r.first_scheduled_time for r in g.children if r.first_scheduled_time), default=None),
            first_token_time=min((r.first_token_time for r in g.children if r.first_token_time), default=None),
            finish_time=max(finish_times) if all(finish_times) else None,
            num_preemptions=sum(r.num_preemptions for r in g.children),
            queue_time=max(r.queue_time for r in g.children),
            num_output_tokens=sum(len(r.output_token_ids) for r in g.children),
        )
        return RequestOutput(
            request_id=g.request_id,
            prompt=g.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outs,
            finished=g.finished,
            metrics=metrics,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
        )

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
            "kv_internal_waste_perc": self.kv.internal_waste(
                {r.request_id: r.num_computed_tokens for r in self.scheduler.running}),
        }
