"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed on static buffers.

A decode step of a big model is hundreds of small kernel launches; replaying a captured graph
removes their CPU cost, which at batch 1 is larger than the GPU time itself. A step whose
sequences all decode one token is padded up to the next captured size: padding rows decode
token 0 at position 0 in a scratch KV block that no sequence owns (the runner allocates it
past the manager's blocks), so they never touch real cache contents, and their outputs are
dropped. Only the Triton attention backend is captured: its plan for a graph is static
(fixed decode ids and split count), while the torch backend reads lengths on the host.

``mode="emulate"`` runs the same padded static-buffer path eagerly, without capturing: it is
how the CPU tests check the padding and scratch-block logic the graphs rely on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from kvserve.layers.attention import AttentionMetadata, KVCache, attention_backend_of

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """The batch-size ladder: 1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (capped)."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


@dataclass
class _Graph:
    size: int
    meta: AttentionMetadata
    out: torch.Tensor | None = None  # [size, hidden], the graph's output buffer
    graph: object | None = None  # torch.cuda.CUDAGraph once captured


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[KVCache], block_size: int, scratch_block: int,
                 max_num_seqs: int, max_model_len: int, device: torch.device, mode: str = "cuda") -> None:
        from kvserve.kernels.triton.backend import TritonAttentionBackend

        backend = attention_backend_of(model)
        if not isinstance(backend, TritonAttentionBackend):
            raise ValueError("decode graphs need one shared TritonAttentionBackend on every attention layer")
        self.backend = backend
        self.model = model
        self.kv_caches = kv_caches
        self.mode = mode
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        top = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), self.scratch_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((top, self.max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.decode_ids = torch.arange(top, dtype=torch.int32, device=device)
        num_kv_heads = kv_caches[0].k.shape[2]
        self.graphs: dict[int, _Graph] = {}
        for s in self.sizes:
            meta = AttentionMetadata(
                query_start_loc=self.query_start_loc[: s + 1], seq_lens=self.seq_lens[:s],
                query_lens_cpu=[1] * s, seq_lens_cpu=[max_model_len] * s,
                slot_mapping=self.slot_mapping[:s], block_tables=self.block_tables[:s],
                plan=self.backend.static_decode_plan(self.decode_ids[:s], max_model_len, num_kv_heads),
            )
            self.graphs[s] = _Graph(s, meta)
        self.pool = None
        self.capture_seconds = 0.0
        if mode == "cuda":
            self._capture_all()

    def _forward(self, g: _Graph) -> torch.Tensor:
        return self.model(self.input_ids[: g.size], self.positions[: g.size], g.meta, self.kv_caches)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t = time.perf_counter()
        for s in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            g = self.graphs[s]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compiles the kernels, settles the allocator
                for _ in range(2):
                    self._forward(g)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                g.out = self._forward(g)
            self.pool = graph.pool()
            g.graph = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.sizes), self.sizes,
                    self.capture_seconds)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states of a decode-only batch, or None when it is larger than the largest graph."""
        n = input_ids.numel()
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:
            return None
        g = self.graphs[size]
        width = meta.block_tables.shape[1]
        if width > self.max_blocks:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        # rows of the previous step may linger past n: reset the padding to the scratch block
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[n:size].fill_(self.scratch_block)
        if g.graph is None:  # emulate: the same buffers, run eagerly
            return self._forward(g)[:n]
        g.graph.replay()
        return g.out[:n]
