"""TritonAttentionBackend: the AttentionBackend interface, run by the paged Triton kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.errors import InvalidRequestError
from kvserve.kernels.triton.decode_attention import num_decode_splits, paged_decode_attention
from kvserve.kernels.triton.extend_attention import paged_extend_attention
from kvserve.kernels.triton.kv_write import write_kv
from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.kv_cache import KVCache
from kvserve.layers.attention.metadata import AttentionMetadata, AttentionPlan
from kvserve.layers.attention.torch_backend import TorchAttentionBackend


@dataclass
class TritonPlan(AttentionPlan):
    """Which sequences go to which kernel."""

    decode_ids: torch.Tensor | None  # [Bd] int32 sequences with exactly one new token
    extend_ids: torch.Tensor | None  # [Be] int32 sequences with more than one
    max_extend_query_len: int
    max_decode_seq_len: int
    num_splits: int = 0  # 0: chosen on the first layer (it needs the KV head count)
    max_splits: int = 16


def split_kv_cache(kv_cache: KVCache | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None, torch.Tensor | None]:
    """A KVCache, or a tuple (K, V) or, for an int8 cache, (K, V, K scales, V scales)."""
    if isinstance(kv_cache, KVCache):
        kv_cache = tuple(kv_cache.tensors())
    if len(kv_cache) == 2:
        k_cache, v_cache = kv_cache
        if k_cache.dtype == torch.int8:
            raise InvalidRequestError("an int8 KV cache needs its scales: pass (k, v, k_scale, v_scale)")
        return k_cache, v_cache, None, None
    k_cache, v_cache, k_scale, v_scale = kv_cache
    return k_cache, v_cache, k_scale, v_scale


class TritonAttentionBackend(AttentionBackend):
    """Writes the new K/V with one kernel, then runs decodes and extends through their own kernels.

    A forward without a KV cache (a one-shot prefill, the memory profile) takes the torch path.
    """

    name = "triton"

    def __init__(self, max_splits: int = 16) -> None:
        self.max_splits = max_splits
        self._torch = TorchAttentionBackend()

    def prepare(self, meta: AttentionMetadata) -> TritonPlan:
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        decodes = [i for i, n in enumerate(qlens) if n == 1]
        extends = [i for i, n in enumerate(qlens) if n > 1]
        device = meta.query_start_loc.device

        def ids(xs: list[int]) -> torch.Tensor | None:
            return torch.tensor(xs, dtype=torch.int32, device=device) if xs else None

        return TritonPlan(
            decode_ids=ids(decodes),
            extend_ids=ids(extends),
            max_extend_query_len=max((qlens[i] for i in extends), default=0),
            max_decode_seq_len=max((slens[i] for i in decodes), default=0),
            max_splits=self.max_splits,
        )

    def static_decode_plan(self, decode_ids: torch.Tensor, max_seq_len: int, num_kv_heads: int) -> TritonPlan:
        """The plan of a captured decode batch: every row decodes, split count sized for max_seq_len.

        A graph replays with whatever lengths its buffers hold, so the split count cannot follow
        the step's longest sequence; splits past a shorter sequence's end are empty and merge as zero.
        """
        n = decode_ids.numel()
        return TritonPlan(decode_ids=decode_ids, extend_ids=None, max_extend_query_len=0, max_decode_seq_len=max_seq_len,
                          num_splits=num_decode_splits(n, num_kv_heads, max_seq_len, decode_ids.device,
                                                       max_splits=self.max_splits))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | tuple[torch.Tensor, ...] | None, meta: AttentionMetadata, plan: TritonPlan,
                scale: float) -> torch.Tensor:
        if kv_cache is None:
            return self._torch.run(q, k, v, None, meta, scale)
        k_cache, v_cache, k_scale, v_scale = split_kv_cache(kv_cache)
        if meta.slot_mapping is not None:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        if meta.block_tables is None:
            raise InvalidRequestError("attention over a KV cache needs block_tables")
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty_like(q)
        if plan.decode_ids is not None:
            if not plan.num_splits:
                plan.num_splits = num_decode_splits(plan.decode_ids.numel(), k_cache.shape[2],
                                                    plan.max_decode_seq_len, q.device, max_splits=plan.max_splits)
            paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                   plan.decode_ids, out, scale, plan.num_splits, k_scale, v_scale)
        if plan.extend_ids is not None:
            paged_extend_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                   plan.extend_ids, plan.max_extend_query_len, out, scale, k_scale, v_scale)
        return out
