"""Process groups and the collectives the parallel layers use.

A `ParallelState` says which shard a process builds. Layers read the current one when they are
constructed and keep it (with its groups) for their collectives, so the current state only
matters while a shard is being built: rank 0 sets it for its own shard and resets it after, so
other models built in the same process (tests, a reference model) stay whole. At TP=1 the
helpers return their input untouched, so the single-process path pays nothing.

Rank layout: ``rank = pp_rank * tp_size + tp_rank``. Rank 0 (stage 0, TP rank 0) hosts the
engine and scheduler. Tensors travel on the device backend (gloo on CPU, NCCL on CUDA); the
small pickled control messages always travel on a gloo group, so they never touch the GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine is split across processes (and, for serving, how many engines there are)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_init_method: str | None = None  # e.g. tcp://10.0.0.1:29500; default: env (torchrun) or loopback
    nnodes: int = 1
    node_rank: int = 0
    timeout_s: float = 60.0  # a collective or result that takes longer fails the engine
    heartbeat_timeout_s: float = 10.0  # a local worker silent this long is hung: the engine fails (0: off)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self, num_heads: int | None = None, num_kv_heads: int | None = None, num_layers: int | None = None,
                 architecture: str | None = None) -> None:
        """Raise a one-line InvalidRequestError for sizes the model or the machines cannot take."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        for name, v in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp),
                        ("data_parallel_size", self.data_parallel_size), ("nnodes", self.nnodes)):
            if not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise InvalidRequestError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise InvalidRequestError(f"tensor x pipeline parallel size ({self.world_size}) must be a multiple of "
                                      f"nnodes ({self.nnodes})")
        if self.world_size > 1 and architecture is not None and architecture == "gpt2":
            raise InvalidRequestError("tensor/pipeline parallelism supports the Llama family (llama, qwen2, qwen3), "
                                      "not gpt2")
        if num_heads is not None and num_heads % tp:
            raise InvalidRequestError(f"tensor_parallel_size {tp} does not divide the model's {num_heads} attention heads")
        if num_kv_heads is not None and num_kv_heads % tp and tp % num_kv_heads:
            raise InvalidRequestError(f"tensor_parallel_size {tp} and the model's {num_kv_heads} KV heads: one must "
                                      "divide the other")
        if num_layers is not None and pp > num_layers:
            raise InvalidRequestError(f"pipeline_parallel_size {pp} exceeds the model's {num_layers} layers")


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: object | None = None  # device backend, this stage's TP ranks
    cpu_group: object | None = None  # gloo, all ranks: control messages
    device: torch.device = torch.device("cpu")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """Global rank of a TP rank (default: ours) in a pipeline stage."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


_STATE = ParallelState()
# bytes this process has all-reduced since start (benchmarks report it per token)
allreduce_bytes = 0


def get_state() -> ParallelState:
    return _STATE


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, tp_size: int, pp_size: int, init_method: str,
                     device: torch.device | str = "cpu", timeout_s: float = 60.0) -> ParallelState:
    """Join the world and build the TP groups; every rank calls this with the same sizes."""
    global _STATE
    if tp_size * pp_size != world_size:
        raise InvalidRequestError(f"tp ({tp_size}) x pp ({pp_size}) != world size ({world_size})")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    cpu_group = dist.group.WORLD if device.type == "cpu" else dist.new_group(backend="gloo", timeout=timeout)
    tp_group = None
    for s in range(pp_size):  # every rank creates every group, in the same order
        ranks = list(range(s * tp_size, (s + 1) * tp_size))
        g = dist.group.WORLD if tp_size == world_size else dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            tp_group = g
    _STATE = ParallelState(rank, world_size, tp_size, rank % tp_size, pp_size, rank // tp_size, tp_group, cpu_group,
                           device)
    logger.info("rank %d/%d: tp %d/%d, pp %d/%d (%s)", rank, world_size, _STATE.tp_rank, tp_size, _STATE.pp_rank,
                pp_size, backend_for(device))
    return _STATE


def set_current(st: ParallelState | None) -> None:
    """The state new layers are built under (None: single process)."""
    global _STATE
    _STATE = st or ParallelState()


def destroy_distributed() -> None:
    global _STATE
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer must not stop our own shutdown
            logger.debug("destroy_process_group failed", exc_info=True)
    _STATE = ParallelState()


def set_state_for_build(tp_size: int = 1, tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0) -> ParallelState:
    """Sizes without groups: build one rank's shard in this process (tests, memory planning)."""
    global _STATE
    _STATE = ParallelState(tp_rank + pp_rank * tp_size, tp_size * pp_size, tp_size, tp_rank, pp_size, pp_rank)
    return _STATE


def env_rendezvous() -> tuple[str, int, int] | None:
    """torchrun's environment, when set: (init method, world size, rank)."""
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        addr, port = os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT", "29500")
        return f"tcp://{addr}:{port}", int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return None


# -- collectives used by the layers -------------------------------------------------------


def tp_all_reduce(x: torch.Tensor, st: ParallelState) -> torch.Tensor:
    """Sum over the TP ranks of `st` (the state a layer was built under), in place; identity at TP=1."""
    global allreduce_bytes
    if st.tp_size == 1:
        return x
    allreduce_bytes += x.numel() * x.element_size()
    dist.all_reduce(x, group=st.tp_group)
    return x


def tp_all_gather_last(x: torch.Tensor, st: ParallelState) -> torch.Tensor:
    """Concatenate each TP rank's x along the last dim (vocab-parallel logits)."""
    if st.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """[start, end) of the layers a stage owns: as even as possible, earlier stages take the extra."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def split_heads(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """(local q heads, local KV heads, first KV head) of a TP rank; KV heads are replicated when fewer than ranks."""
    if tp_size <= num_kv_heads:
        local_kv = num_kv_heads // tp_size
        return num_heads // tp_size, local_kv, tp_rank * local_kv
    # each rank holds one KV head, shared by tp_size / num_kv_heads consecutive ranks
    return num_heads // tp_size, 1, tp_rank // (tp_size // num_kv_heads)
