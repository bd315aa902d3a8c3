"""Multi-node start-up: the same `kvserve serve` command on every machine.

Node 0 runs the engine (rank 0) and spawns its other local ranks; a machine started with
`--node-rank k` (k > 0) only hosts ranks k*per_node .. (k+1)*per_node - 1 and waits for node 0's
instructions. Under torchrun every process already is a rank (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT): rank 0 serves, the others run the worker loop.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch.multiprocessing as mp

from kvserve.distributed.parallel_state import ParallelConfig, env_rendezvous
from kvserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def is_worker_node(node_rank: int) -> bool:
    """True when this process (or machine) hosts worker ranks only."""
    env = env_rendezvous()
    return node_rank > 0 or (env is not None and env[2] != 0)


def run_worker_node(args: argparse.Namespace) -> int:
    """Run this machine's ranks until node 0 shuts them down; the exit code is the worst of theirs."""
    from kvserve.distributed.worker import worker_main

    pcfg = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size, 1, args.distributed_init_method,
                          args.nnodes, args.node_rank, args.distributed_timeout)
    pcfg.validate()
    env = env_rendezvous()
    level = logging.getLogger().level
    common = (pcfg.world_size, pcfg.tensor_parallel_size, pcfg.pipeline_parallel_size)
    if env is not None and args.distributed_init_method is None:
        init_method, world, rank = env
        if world != pcfg.world_size:
            raise InvalidRequestError(f"WORLD_SIZE={world} but tensor x pipeline parallel size is {pcfg.world_size}")
        worker_main(rank, *common, init_method, args.device, pcfg.timeout_s, args.num_threads, level)
        return 0
    if args.distributed_init_method is None:
        raise InvalidRequestError("--node-rank > 0 needs --distributed-init-method tcp://NODE0:PORT")
    per_node = pcfg.world_size // pcfg.nnodes
    ranks = range(pcfg.node_rank * per_node, (pcfg.node_rank + 1) * per_node)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, name=f"kvserve-worker-{r}",
                         args=(r, *common, args.distributed_init_method, args.device, pcfg.timeout_s,
                               args.num_threads, level)) for r in ranks]
    for p in procs:
        p.start()
    logger.info("node %d: ranks %s started (pid %d)", pcfg.node_rank, list(ranks), os.getpid())
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)
