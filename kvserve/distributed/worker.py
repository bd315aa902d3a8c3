"""One rank's shard of the model and the worker loop of ranks other than 0.

Every rank, rank 0 included, runs a step the same way (`ShardRunner.run`): block copies, the
forward of its layers (a stage after the first receives the previous stage's hidden states,
a stage before the last sends its own on), and on the last stage the logits of the rows that
need them (a TP collective). The last stage's TP rank 0 sends those logits to rank 0, which
samples: sampling happens in one place, with the Request objects, exactly as at TP=1.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from kvserve.distributed import parallel_state as ps
from kvserve.distributed.messages import TAG_HIDDEN, TAG_LOGITS, Outbox, StepMsg, recv_obj, send_obj
from kvserve.layers.attention import AttentionMetadata, KVCache, allocate_kv_caches, copy_blocks, prepare_attention

logger = logging.getLogger(__name__)


class ShardRunner:
    """Runs StepMsgs on this rank's shard with this rank's KV cache slice."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], host_caches: list[KVCache],
                 device: torch.device, outbox: Outbox, state: ps.ParallelState) -> None:
        self.model = model
        self.state = state
        self.kv_caches = kv_caches
        self.host_caches = host_caches
        self.device = device
        self.outbox = outbox
        self.dtype = next(p for p in model.parameters()).dtype

    @torch.inference_mode()
    def run(self, msg: StepMsg) -> torch.Tensor | None:
        """The step on this shard; returns the logits of `msg.logit_rows` on the last stage (else None)."""
        st = self.state
        if msg.swap_out:
            copy_blocks(self.kv_caches, self.host_caches, msg.swap_out)
        if msg.swap_in:
            copy_blocks(self.host_caches, self.kv_caches, msg.swap_in)
        if not msg.query_lens:
            return None
        dev = self.device
        meta = prepare_attention(self.model, AttentionMetadata.flat(msg.query_lens, msg.seq_lens, msg.slot_mapping,
                                                                    msg.block_tables, dev))
        hidden_in = None
        if not st.is_first_stage:
            hidden_in = torch.empty(len(msg.input_ids), self.model.config.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(hidden_in, st.stage_rank(st.pp_rank - 1), tag=TAG_HIDDEN)
        hidden = self.model(msg.input_ids.to(dev), msg.positions.to(dev), meta, self.kv_caches, hidden_states=hidden_in)
        if not st.is_last_stage:
            self.outbox.send(hidden.contiguous(), st.stage_rank(st.pp_rank + 1), TAG_HIDDEN)
            return None
        if not msg.logit_rows:
            return None
        rows = torch.tensor(msg.logit_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows]).float()


def load_shard(init: dict) -> object:
    """Load this rank's shard (under the current parallel state) from the init message."""
    from kvserve.layers.attention import make_attention_backend, set_attention_backend
    from kvserve.loader import load_model

    device = ps.get_state().device
    lm = load_model(init["model"], dtype=init["dtype"], device=device, quantization=init["quantization"])
    set_attention_backend(lm.model, make_attention_backend(init["attention_backend"], device))
    return lm


def _beat(heartbeat, every: float) -> None:  # noqa: ANN001 - a multiprocessing RawValue("d")
    """Write CLOCK_MONOTONIC into the shared `heartbeat` every `every` seconds (rank 0 watches it)."""
    while True:
        heartbeat.value = time.monotonic()
        time.sleep(every)


def worker_main(rank: int, world_size: int, tp: int, pp: int, init_method: str, device: str, timeout_s: float,
                num_threads: int | None, log_level: int = logging.WARNING, heartbeat=None,  # noqa: ANN001
                beat_every: float = 1.0) -> None:
    """Entry point of a worker process: join, load the shard, then run steps until told to stop."""
    logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if heartbeat is not None:  # a thread of its own: beats while the main thread waits in a collective
        threading.Thread(target=_beat, args=(heartbeat, beat_every), name="kvserve-heartbeat", daemon=True).start()
    torch.set_num_threads(num_threads or 1)
    try:
        ps.init_distributed(rank, world_size, tp, pp, init_method, device, timeout_s)
        st = ps.get_state()
        group = st.cpu_group
        outbox = Outbox()
        kind, init = recv_obj(0, group)
        assert kind == "load", kind
        lm = load_shard(init)
        kind, cache = recv_obj(0, group)
        assert kind == "cache", kind
        kv = allocate_kv_caches(lm.model, cache["num_blocks"], cache["block_size"], cache["kv_dtype"], st.device)
        host = allocate_kv_caches(lm.model, cache["num_host_blocks"], cache["block_size"], cache["kv_dtype"], "cpu") \
            if cache["num_host_blocks"] else []
        runner = ShardRunner(lm.model, kv, host, st.device, outbox, st)
        send_obj(outbox, ("ready", rank), 0, group)
        send_logits = st.is_last_stage and st.tp_rank == 0 and rank != 0
        while True:
            kind, payload = recv_obj(0, group)
            if kind == "shutdown":
                break
            if kind == "step":
                logits = runner.run(payload)
                if send_logits and logits is not None:
                    outbox.send(logits, 0, TAG_LOGITS)
            elif kind == "prefill_logits":
                logits = _prefill_logits(lm.model, payload, st)
                if send_logits:
                    outbox.send(logits, 0, TAG_LOGITS)
            elif kind == "stats":
                send_obj(outbox, {"allreduce_bytes": ps.allreduce_bytes}, 0, group)
        outbox.drain()
        dist.barrier(group=group)  # rank 0 waits here too before anyone destroys the process group
    except Exception:  # noqa: BLE001 - a worker's failure ends the process; rank 0 notices and reports
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    ps.destroy_distributed()


@torch.inference_mode()
def _prefill_logits(model: torch.nn.Module, seqs: list[list[int]], st: ps.ParallelState) -> torch.Tensor | None:
    """Logits of every position of each sequence, no KV cache (tests and scoring)."""
    dev = st.device
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    pos = torch.tensor([p for s in seqs for p in range(len(s))], device=dev)
    meta = AttentionMetadata.for_prefill([len(s) for s in seqs], dev)
    hidden_in = None
    if not st.is_first_stage:
        hidden_in = torch.empty(len(ids), model.config.hidden_size, dtype=next(model.parameters()).dtype, device=dev)
        dist.recv(hidden_in, st.stage_rank(st.pp_rank - 1), tag=TAG_HIDDEN)
    hidden = model(ids, pos, meta, None, hidden_states=hidden_in)
    if not st.is_last_stage:
        dist.send(hidden.contiguous(), st.stage_rank(st.pp_rank + 1), tag=TAG_HIDDEN)
        return None
    return model.compute_logits(hidden).float()
