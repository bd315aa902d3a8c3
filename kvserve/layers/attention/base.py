"""The attention backend interface: prepare once per step, forward once per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvserve.layers.attention.kv_cache import KVCache
from kvserve.layers.attention.metadata import AttentionMetadata, AttentionPlan


class AttentionBackend(ABC):
    """Writes a layer's new K/V into its paged cache and attends every new token over its context.

    One instance is shared by all layers of a model: `prepare` digests the step's metadata once
    (which sequences decode, which extend, host-side lists), `forward` runs per layer on that plan.
    """

    name: str

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> AttentionPlan:
        """The step's plan, shared by every layer (host work only: no kernel runs here)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata, plan: AttentionPlan, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]; with a cache, k/v are first stored at meta.slot_mapping."""

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
            meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """prepare + forward in one call (kernel tests, one-off calls)."""
        return self.forward(q, k, v, kv_cache, meta, self.prepare(meta), scale)
