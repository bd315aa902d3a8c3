"""MultiProcExecutor: rank 0's side of a tensor/pipeline-parallel engine.

The engine process is rank 0 (pipeline stage 0, TP rank 0) and keeps the scheduler. It spawns
the other local ranks (`torch.multiprocessing`, spawn context), joins the process group, tells
every rank what to load, and afterwards sends each step as one small pickled `StepMsg`.

Pipeline parallelism: `submit` runs stage 0 and sends its hidden states on without waiting for
the later stages, and `collect` waits for the logits of that micro-batch from the last stage,
so the engine can keep up to `pipeline_parallel_size` micro-batches in flight.

Failure: each wait is bounded (the process-group timeout), a peer that dies closes its sockets
so a blocked collective fails at once, and `check_health` polls the local workers' liveness.
Any of these raises `WorkerDiedError` (naming the rank and its exit code), after which the
executor stops the remaining workers; the engine does not hang.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.distributed import parallel_state as ps
from kvserve.distributed.messages import TAG_LOGITS, Outbox, StepMsg, recv_obj, send_obj
from kvserve.distributed.parallel_state import ParallelConfig
from kvserve.distributed.worker import ShardRunner, _prefill_logits, load_shard, worker_main
from kvserve.engine.request import Logprob
from kvserve.engine.scheduler import SchedulerOutput
from kvserve.errors import KVServeError
from kvserve.executor.model_runner import ModelRunner, RunnerOutput, prompt_logprob_entries

logger = logging.getLogger(__name__)


class WorkerDiedError(KVServeError):
    """A parallel worker exited or stopped answering; the engine cannot go on."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pending:
    """A submitted micro-batch: its logits, or the receive that will bring them."""

    so: SchedulerOutput
    msg: StepMsg
    samplers: list  # the Requests whose logits rows come first, in order
    prompt_lp: list[tuple[object, int, int, int]]  # (Request, first, skip, n) of prompt-logprob rows, then
    logits: torch.Tensor | None = None
    work: object | None = None


class MultiProcExecutor:
    def __init__(self, pcfg: ParallelConfig, device: torch.device, num_threads: int | None = None) -> None:
        self.pcfg = pcfg
        self.world_size = pcfg.world_size
        self.procs: list[tuple[int, mp.Process]] = []
        self.dead: str | None = None
        self.timeout = datetime.timedelta(seconds=pcfg.timeout_s)
        env = ps.env_rendezvous()
        per_node = self.world_size // pcfg.nnodes
        if env is not None and pcfg.distributed_init_method is None:
            init_method, world, rank = env  # torchrun started every rank itself
            if world != self.world_size or rank != 0:
                raise KVServeError(f"torchrun WORLD_SIZE={world} RANK={rank}: the engine is rank 0 of "
                                   f"tensor x pipeline = {self.world_size} ranks")
            local = []
        else:
            init_method = pcfg.distributed_init_method or f"tcp://127.0.0.1:{_free_port()}"
            local = list(range(1, per_node))  # node 0 holds ranks 0..per_node-1; other nodes start theirs
        # CPU: the node's cores are shared by its ranks (2 cores, 2 ranks: 1 thread each), rank 0 included;
        # the process's own setting comes back at shutdown
        self._threads_before = torch.get_num_threads()
        if num_threads is None and device.type == "cpu":
            num_threads = max(1, (os.cpu_count() or 1) // per_node)
        if num_threads:
            torch.set_num_threads(num_threads)
        ctx = mp.get_context("spawn")
        for r in local:
            p = ctx.Process(target=worker_main, name=f"kvserve-worker-{r}", daemon=True,
                            args=(r, self.world_size, pcfg.tensor_parallel_size, pcfg.pipeline_parallel_size,
                                  init_method, str(device), pcfg.timeout_s, num_threads, logging.getLogger().level))
            p.start()
            self.procs.append((r, p))
        atexit.register(self.shutdown)
        # join on a helper thread, so that a worker dying during start-up is reported at once
        # instead of after the rendezvous timeout
        box: dict[str, object] = {}

        def join() -> None:
            try:
                box["state"] = ps.init_distributed(0, self.world_size, pcfg.tensor_parallel_size,
                                                   pcfg.pipeline_parallel_size, init_method, device, pcfg.timeout_s)
            except Exception as e:  # noqa: BLE001 - reported below
                box["error"] = e

        t = threading.Thread(target=join, name="kvserve-rendezvous", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            for r, p in self.procs:
                if not p.is_alive():
                    self._fail(f"parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode} during start-up")
        if "error" in box:
            self._fail(f"process group did not form: {box['error']}")
        self.state = box["state"]
        ps.set_current(None)  # only rank 0's own shard is built under it (see load)
        self.outbox = Outbox()
        self.last_rank = self.state.stage_rank(self.state.pp_size - 1, 0)
        self.runner: ParallelRunner | None = None

    # -- life cycle -----------------------------------------------------------------------

    def _broadcast(self, kind: str, payload: object) -> None:
        for r in range(1, self.world_size):
            send_obj(self.outbox, (kind, payload), r, self.state.cpu_group)

    def load(self, init: dict) -> object:
        """Every rank loads its shard (rank 0 in this process); returns rank 0's LoadedModel."""
        self._guard(lambda: self._broadcast("load", init))
        ps.set_current(self.state)
        try:
            return load_shard(init)
        finally:
            ps.set_current(None)

    def make_runner(self, lm: object, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                    num_host_blocks: int, max_num_seqs: int, max_model_len: int) -> "ParallelRunner":
        cache = dict(num_blocks=num_blocks, block_size=block_size, kv_dtype=kv_dtype, num_host_blocks=num_host_blocks)

        def go() -> None:
            self._broadcast("cache", cache)
            for r in range(1, self.world_size):  # every rank has loaded and allocated
                kind, _ = recv_obj(r, self.state.cpu_group, datetime.timedelta(seconds=max(600, self.pcfg.timeout_s)))
                assert kind == "ready"

        self._guard(go)
        self.runner = ParallelRunner(self, lm.model, num_blocks, block_size, kv_dtype, self.state.device,
                                     num_host_blocks, max_num_seqs, max_model_len)
        return self.runner

    def check_health(self) -> None:
        """Raise WorkerDiedError if the executor failed or a local worker has exited."""
        if self.dead is not None:
            raise WorkerDiedError(self.dead)
        for r, p in self.procs:
            if not p.is_alive():
                self._fail(f"parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}")

    def _fail(self, why: str) -> None:
        logger.error("%s; stopping the engine", why)
        self.dead = why
        self.shutdown(graceful=False)
        raise WorkerDiedError(why)

    def _guard(self, fn):  # type: ignore[no-untyped-def]
        """Run a communicating call; a torch.distributed failure becomes WorkerDiedError."""
        self.check_health()
        try:
            return fn()
        except WorkerDiedError:
            raise
        except (RuntimeError, dist.DistBackendError) as e:
            for r, p in self.procs:  # give the dying process a moment to be reaped for a precise message
                p.join(0.5)
                if not p.is_alive():
                    self._fail(f"parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}: {e}")
            self._fail(f"parallel communication failed: {e}")

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker (politely first) and leave the process group; safe to call twice."""
        if not self.procs and not dist.is_initialized():
            return
        if graceful and self.dead is None and dist.is_initialized():
            try:
                self._broadcast("shutdown", None)
                self.outbox.drain(timeout=datetime.timedelta(seconds=5))
                # leave together: a peer that tears its connections down while this rank's gloo
                # threads still use them makes gloo abort the process (seen as SIGABRT at exit)
                dist.barrier(group=self.state.cpu_group)
            except Exception:  # noqa: BLE001
                logger.debug("shutdown message not delivered", exc_info=True)
            for _, p in self.procs:
                p.join(10)
        for _, p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        ps.destroy_distributed()
        torch.set_num_threads(self._threads_before)
        atexit.unregister(self.shutdown)

    def allreduce_bytes(self) -> int:
        """Bytes all-reduced so far by rank 0 (every TP rank moves the same amount)."""
        return ps.allreduce_bytes

    # -- steps ----------------------------------------------------------------------------

    def submit(self, msg: StepMsg, runner: ShardRunner) -> tuple[torch.Tensor | None, object | None]:
        def go():  # type: ignore[no-untyped-def]
            self._broadcast("step", msg)
            logits = runner.run(msg)
            work = None
            if self.state.pp_size > 1 and msg.logit_rows:
                logits = torch.empty(len(msg.logit_rows), self.vocab_size, dtype=torch.float32,
                                     device=self.state.device)
                work = dist.irecv(logits, self.last_rank, tag=TAG_LOGITS)
            return logits, work

        return self._guard(go)

    def wait(self, work: object) -> None:
        self._guard(lambda: work.wait(self.timeout))

    def prefill_logits(self, seqs: list[list[int]], model: torch.nn.Module) -> torch.Tensor:
        """Logits [sum(len), vocab] of every position of each sequence, without a cache (tests, scoring)."""
        def go() -> torch.Tensor:
            self._broadcast("prefill_logits", seqs)
            logits = _prefill_logits(model, seqs, self.state)
            if self.state.pp_size > 1:
                logits = torch.empty(sum(len(s) for s in seqs), self.vocab_size, dtype=torch.float32,
                                     device=self.state.device)
                dist.irecv(logits, self.last_rank, tag=TAG_LOGITS).wait(self.timeout)
            return logits

        return self._guard(go)

    @property
    def vocab_size(self) -> int:
        assert self.runner is not None
        return self.runner.model.config.vocab_size


class ParallelRunner(ModelRunner):
    """The engine's runner on rank 0 of a parallel engine: same contract as ModelRunner
    (execute(so) -> RunnerOutput), plus submit/collect for pipelined micro-batches."""

    def __init__(self, executor: MultiProcExecutor, model: torch.nn.Module, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, num_host_blocks: int, max_num_seqs: int,
                 max_model_len: int) -> None:
        super().__init__(model, num_blocks, block_size, kv_dtype, device, num_host_blocks, "off", max_num_seqs,
                         max_model_len)
        self.executor = executor
        self.shard = ShardRunner(model, self.kv_caches, self.host_caches, self.device, executor.outbox, executor.state)
        self.in_flight: deque[Pending] = deque()

    def flatten(self, so: SchedulerOutput) -> Pending:
        """The step as workers need it (tensors, block copies, the rows that need logits), and what
        rank 0 needs to turn those logits into tokens later, read now: requests may change meanwhile."""
        if not so.scheduled:
            e = torch.empty(0, dtype=torch.long)
            return Pending(so, StepMsg(e, e, [], [], e, e.int(), [], so.blocks_to_swap_out, so.blocks_to_swap_in),
                           [], [])
        b = self.prepare(so.scheduled)
        rows: list[int] = []
        samplers = []
        start = 0
        for s in so.scheduled:
            if s.samples:
                rows.append(start + s.num_new_tokens - 1)
                samplers.append(s.request)
            start += s.num_new_tokens
        start = 0
        prompt_lp = []
        for s in so.scheduled:  # then each chunk's prompt-logprob rows, as ModelRunner._prompt_logprobs picks them
            r = s.request
            if r.params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens - 1:
                first = r.num_computed_tokens
                n = min(s.num_new_tokens, r.num_prompt_tokens - 1 - first)
                skip = max(0, len(r.prompt_logprobs) - 1 - first)
                prompt_lp.append((r, first, skip, n))
                rows.extend(range(start + skip, start + n))
            start += s.num_new_tokens
        meta = b.meta
        msg = StepMsg(b.input_ids.cpu(), b.positions.cpu(), meta.query_lens_cpu, meta.seq_lens_cpu,
                      meta.slot_mapping.cpu(), meta.block_tables.cpu(), rows, so.blocks_to_swap_out,
                      so.blocks_to_swap_in)
        return Pending(so, msg, samplers, prompt_lp)

    @torch.inference_mode()
    def submit(self, so: SchedulerOutput) -> Pending:
        p = self.flatten(so)
        p.logits, p.work = self.executor.submit(p.msg, self.shard)
        self.in_flight.append(p)
        return p

    @torch.inference_mode()
    def collect(self, p: Pending) -> RunnerOutput:
        """Wait for a submitted micro-batch's logits; sample and report logprobs on rank 0."""
        self.in_flight.remove(p)
        if p.work is not None:
            self.executor.wait(p.work)
        out = RunnerOutput()
        if p.logits is None:
            return out
        logits = p.logits
        reqs = p.samplers
        if reqs:
            res = self.sampler(logits[: len(reqs)].clone(), reqs)
            for r, tok, lp in zip(reqs, res.token_ids, res.logprobs):
                out.sampled[r.request_id] = tok
                if lp is not None:
                    out.logprobs[r.request_id] = Logprob(tok, lp[0], lp[1])
        i = len(reqs)
        for r, first, skip, n in p.prompt_lp:
            if skip >= n:
                out.prompt_logprobs[r.request_id] = []
                continue
            lp = torch.log_softmax(logits[i : i + n - skip], dim=-1)
            i += n - skip
            out.prompt_logprobs[r.request_id] = prompt_logprob_entries(lp, r, first, skip, n)
        return out

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        return self.collect(self.submit(so))

    def prefill_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        logits = self.executor.prefill_logits(seqs, self.model)
        return list(logits.split([len(s) for s in seqs]))
