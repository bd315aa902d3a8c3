"""The Attention layer of a model: shapes in, shapes out; the math lives in its backend."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.kv_cache import KVCache
from kvserve.layers.attention.metadata import AttentionMetadata
from kvserve.layers.attention.torch_backend import TorchAttentionBackend


class Attention(nn.Module):
    """Multi-head / grouped-query attention of one layer."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale if scale is not None else head_dim**-0.5
        self.backend: AttentionBackend = backend if backend is not None else TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, Hkv*D] -> [T, H*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # the runner prepares once per step; a forward outside it (tests, evaluation) prepares per layer
        plan = meta.plan if meta.plan is not None else self.backend.prepare(meta)
        o = self.backend.forward(q, k, v, kv_cache, meta, plan, self.scale)
        return o.reshape(T, self.num_heads * self.head_dim)
