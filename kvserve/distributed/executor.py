"""MultiProcExecutor: rank 0's side of a tensor/pipeline-parallel engine.

The engine process is rank 0 (pipeline stage 0, TP rank 0) and keeps the scheduler. It spawns
the other local ranks (`torch.multiprocessing`, spawn context), joins the process group, tells
every rank what to load, and afterwards sends each step as one small pickled `StepMsg`.

Pipeline parallelism: `submit` runs stage 0 and sends its hidden states on without waiting for
the later stages, and `collect` waits for the logits of that micro-batch from the last stage,
so the engine can keep up to `pipeline_parallel_size` micro-batches in flight.

Failure: each wait is bounded (the process-group timeout), a peer that dies closes its sockets
so a blocked collective fails at once, and `check_health` polls the local workers' liveness.
A hung worker (stopped, or stuck without releasing the GIL) keeps its sockets open, so a
collective with it would wait the whole timeout: every local worker beats a heartbeat (a
shared timestamp, from a thread of its own) and a monitor thread here kills one that has been
silent for `heartbeat_timeout_s`; its closed sockets then fail the blocked collective at once.
Any of these raises `WorkerDiedError` (naming the rank and why), after which the executor
stops the remaining workers; the engine does not hang. (Ranks started by torchrun or on other
nodes have no heartbeat here: the collective timeout covers them.)
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.distributed import parallel_state as ps
from kvserve.distributed.messages import TAG_LOGITS, Outbox, StepMsg, recv_obj, send_obj
from kvserve.distributed.parallel_state import ParallelConfig
from kvserve.distributed.worker import ShardRunner, _prefill_logits, load_shard, worker_main
from kvserve.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from kvserve.errors import KVServeError
from kvserve.executor.forward_batch import ForwardBatch
from kvserve.executor.model_runner import ModelRunner

if TYPE_CHECKING:
    from kvserve.config import EngineConfig

logger = logging.getLogger(__name__)


class WorkerDiedError(KVServeError):
    """A parallel worker exited or stopped answering; the engine cannot go on."""


# A spawned worker re-imports the main script; one without a main guard would start workers of its own.
# The worker then exits with this code and rank 0 explains (multiprocessing's own error says little).
NO_MAIN_GUARD_EXIT = 86
NO_MAIN_GUARD = (
    "a parallel worker re-ran your script's engine set-up and stopped. kvserve starts its workers with "
    "multiprocessing's 'spawn' method, which imports the main script again in every new process, so code "
    "that creates an LLM or engine at the top level of a script runs once more in each worker. Put that code "
    "under `if __name__ == \"__main__\":` (or in a function called from there) and run the script again.")


def _exit_if_spawn_bootstrap() -> None:
    """In a spawned child still importing the parent's main script: leave quietly with NO_MAIN_GUARD_EXIT."""
    if getattr(mp.current_process(), "_inheriting", False):
        sys.exit(NO_MAIN_GUARD_EXIT)


def _exit_reason(rank: int, p: mp.Process) -> str:
    if p.exitcode == NO_MAIN_GUARD_EXIT:
        return NO_MAIN_GUARD
    return f"parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"


def heartbeat_period(timeout_s: float) -> float:
    """How often a worker beats: several beats per timeout, at most one a second."""
    return min(1.0, timeout_s / 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pending:
    """A submitted micro-batch: its logits, or the receive that will bring them."""

    so: SchedulerOutput
    msg: StepMsg
    batch: ForwardBatch | None  # None: block copies only
    logits: torch.Tensor | None = None
    work: object | None = None


class MultiProcExecutor:
    def __init__(self, pcfg: ParallelConfig, device: torch.device, num_threads: int | None = None) -> None:
        _exit_if_spawn_bootstrap()
        self.pcfg = pcfg
        self.world_size = pcfg.world_size
        self.procs: list[tuple[int, mp.Process]] = []
        self.dead: str | None = None
        self.hung: str | None = None  # set by the heartbeat monitor when it killed a silent worker
        self._beats: list[tuple[int, mp.Process, object]] = []
        self._monitor_stop = threading.Event()
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
        beat_every = heartbeat_period(pcfg.heartbeat_timeout_s) if pcfg.heartbeat_timeout_s > 0 else None
        for r in local:
            beat = ctx.RawValue("d", 0.0)  # CLOCK_MONOTONIC of the last beat; 0 until the worker's first
            p = ctx.Process(target=worker_main, name=f"kvserve-worker-{r}", daemon=True,
                            args=(r, self.world_size, pcfg.tensor_parallel_size, pcfg.pipeline_parallel_size,
                                  init_method, str(device), pcfg.timeout_s, num_threads, logging.getLogger().level),
                            kwargs=dict(heartbeat=beat if beat_every else None, beat_every=beat_every or 1.0))
            p.start()
            self.procs.append((r, p))
            self._beats.append((r, p, beat))
        atexit.register(self.shutdown)
        if beat_every and self._beats:
            threading.Thread(target=self._monitor, args=(pcfg.heartbeat_timeout_s, beat_every),
                             name="kvserve-heartbeat", daemon=True).start()
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
                    self._fail(_exit_reason(r, p) + ("" if p.exitcode == NO_MAIN_GUARD_EXIT else " during start-up"))
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

    def _monitor(self, timeout_s: float, every: float) -> None:
        """Kill a local worker whose heartbeat is older than `timeout_s` (one not beating yet is still
        starting: the rendezvous and load have their own bounds); the engine then fails with `hung`."""
        while not self._monitor_stop.wait(every):
            for r, p, beat in self._beats:
                last = beat.value
                silent = time.monotonic() - last
                if last > 0 and silent > timeout_s and p.is_alive() and self.hung is None:
                    self.hung = (f"parallel worker rank {r} (pid {p.pid}) sent no heartbeat for {silent:.1f} s "
                                 f"(hung or stopped; --worker-heartbeat-timeout {timeout_s:g})")
                    logger.error("%s; killing it", self.hung)
                    p.kill()  # its sockets close: a collective waiting on it fails now, not at the timeout
                    return

    def check_health(self) -> None:
        """Raise WorkerDiedError if the executor failed or a local worker has exited or hung."""
        if self.dead is not None:
            raise WorkerDiedError(self.dead)
        if self.hung is not None:
            self._fail(self.hung)
        for r, p in self.procs:
            if not p.is_alive():
                self._fail(_exit_reason(r, p))

    def _fail(self, why: str, detail: BaseException | None = None) -> None:
        """Stop the workers and raise WorkerDiedError(why). `detail` (the backend's error, which names its
        source files) goes to the log only: `why` reaches clients in the error events of their streams."""
        if detail is not None:
            logger.error("%s (%s); stopping the engine", why, detail)
        else:
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
            if self.hung is not None:
                self._fail(self.hung, e)
            for r, p in self.procs:  # give the dying process a moment to be reaped for a precise message
                p.join(0.5)
                if not p.is_alive():
                    self._fail(f"parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}", e)
            self._fail("parallel communication failed (a worker stopped answering; see the server log)", e)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker (politely first) and leave the process group; safe to call twice."""
        self._monitor_stop.set()
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
    (step / execute -> RunnerOutput); under pipeline parallelism `step` keeps up to
    pipeline_parallel_size micro-batches in flight."""

    def __init__(self, executor: MultiProcExecutor, model: torch.nn.Module, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, num_host_blocks: int, max_num_seqs: int,
                 max_model_len: int) -> None:
        super().__init__(model, num_blocks, block_size, kv_dtype, device, num_host_blocks, "off", max_num_seqs,
                         max_model_len)
        self.executor = executor
        self.shard = ShardRunner(model, self.kv_caches, self.host_caches, self.device, executor.outbox, executor.state)
        self.in_flight: deque[Pending] = deque()
        self.pipeline_depth = executor.pcfg.pipeline_parallel_size
        self._samples = 0  # micro-batches collected, and the in-flight count summed at each
        self._depth_sum = 0

    def step(self, scheduler: Scheduler) -> tuple[SchedulerOutput, RunnerOutput]:
        """Submit micro-batches until `pipeline_depth` are in flight, then collect the oldest.

        A request is in at most one micro-batch at a time (the scheduler does not schedule a request
        in flight again: its next tokens depend on this batch's result). One whose batch comes back
        after it was preempted or aborted meanwhile has its result dropped by the scheduler's update;
        its K/V writes are harmless, since every stage runs micro-batches in submission order.
        """
        if self.pipeline_depth == 1:
            return super().step(scheduler)
        # split the work into pipeline_depth micro-batches, so that every stage has one to run
        cap = max(1, -(-scheduler.num_unfinished // self.pipeline_depth))
        while len(self.in_flight) < self.pipeline_depth:
            so = scheduler.schedule(max_seqs=cap)
            if so.is_empty:
                break
            self.submit(so)
        if not self.in_flight:
            return SchedulerOutput(), RunnerOutput()
        self._samples += 1
        self._depth_sum += len(self.in_flight)
        p = self.in_flight[0]
        return p.so, self.collect(p)

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)

    def pipeline_stats(self) -> dict[str, float]:
        """Pipeline occupancy: mean micro-batches in flight when one is collected, and the bubble
        (1 - mean / pipeline_parallel_size: the share of stage slots left idle)."""
        mean = self._depth_sum / self._samples if self._samples else 0.0
        return {"pipeline_in_flight_mean": mean,
                "pipeline_bubble": 1.0 - mean / self.pipeline_depth if self._samples else 0.0}

    def flatten(self, so: SchedulerOutput) -> Pending:
        """The step as workers need it (tensors, block copies, the rows that need logits); the
        ForwardBatch keeps what rank 0 needs to turn those logits into tokens later, read now:
        requests may change meanwhile."""
        if not so.scheduled:
            e = torch.empty(0, dtype=torch.long)
            return Pending(so, StepMsg(e, e, [], [], e, e.int(), [], so.blocks_to_swap_out, so.blocks_to_swap_in),
                           None)
        b = self.prepare(so.scheduled)
        meta = b.meta
        msg = StepMsg(b.input_ids.cpu(), b.positions.cpu(), meta.query_lens_cpu, meta.seq_lens_cpu,
                      meta.slot_mapping.cpu(), meta.block_tables.cpu(), b.logit_rows, so.blocks_to_swap_out,
                      so.blocks_to_swap_in)
        return Pending(so, msg, b)

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
        if p.logits is None or p.batch is None:
            return RunnerOutput()
        b = p.batch
        n = len(b.samplers)
        logits = p.logits[:n].clone() if n else None
        prompt_logits: list[torch.Tensor | None] = []
        i = n
        for sp in b.prompt_spans:
            prompt_logits.append(p.logits[i : i + sp.num_rows] if sp.num_rows else None)
            i += sp.num_rows
        return self.sample(b, logits, prompt_logits)

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        return self.collect(self.submit(so))

    def prefill_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        logits = self.executor.prefill_logits(seqs, self.model)
        return list(logits.split([len(s) for s in seqs]))


def start_parallel(config: "EngineConfig", loaded: object | None, device: torch.device) -> tuple[MultiProcExecutor, object]:
    """Spawn the workers, then load rank 0's shard here while they load theirs (a `loaded` model only
    names the checkpoint: every rank, this one included, reads its own slice of it)."""
    from pathlib import Path

    from kvserve.loader import default_model_path
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.hf import HFModelDir

    c = config
    pcfg = c.parallel_config()
    path = Path(loaded.path if loaded is not None else (default_model_path() if c.model is None else c.model))
    src = HFModelDir(path) if path.is_dir() else GGUFFile(path)
    mcfg = src.model_config()
    pcfg.validate(mcfg.num_heads, mcfg.num_kv_heads, mcfg.num_layers, mcfg.architecture)
    quant = loaded.quantization if loaded is not None else c.quantization
    dtype = str(loaded.dtype).removeprefix("torch.") if loaded is not None else c.dtype
    executor = MultiProcExecutor(pcfg, device, c.num_threads)
    try:
        lm = executor.load(dict(model=str(path), dtype=dtype, quantization=quant,
                                attention_backend=c.attention_backend))
    except BaseException:
        executor.shutdown(graceful=False)
        raise
    return executor, lm
