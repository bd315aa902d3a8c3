"""The memory plan: weights + a measured activation peak + KV blocks = the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvserve.config import EngineConfig
from kvserve.errors import InvalidRequestError
from kvserve.layers.attention import AttentionMetadata, KVCache
from kvserve.platform import available_memory, peak_rss, trim_heap


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
    draft_kv_bytes_per_token: int = 0  # a draft model's own cache (speculative decoding), same blocks

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        return self.kv_tokens / self.max_model_len

    def describe(self) -> str:
        mib = 2**20
        act = "not measured" if self.activations is None else f"{self.activations / mib:.0f} MiB"
        draft = f", draft model's cache {self.draft_kv_bytes_per_token / 1024:.1f} KiB/token included" \
            if self.draft_kv_bytes_per_token else ""
        return (
            f"memory: weights {self.weights / mib:.0f} MiB, activations {act}, KV cache ({self.kv_dtype}) "
            f"{self.kv_cache / mib:.0f} MiB "
            f"= {self.num_blocks} blocks x {self.block_size} tokens = {self.kv_tokens} tokens "
            f"({self.kv_bytes_per_token / 1024:.1f} KiB/token{draft}); max concurrency at max_model_len={self.max_model_len}: "
            f"{self.max_concurrency:.2f} sequences"
        )


def kv_bytes_per_token(model: nn.Module, kv_dtype: torch.dtype) -> int:
    """KV bytes one token takes on this rank: its KV heads of its layers (rank 0 holds the most layers)."""
    cfg = model.config
    return getattr(model, "num_local_layers", cfg.num_layers) * KVCache.bytes_per_token(
        getattr(model, "num_local_kv_heads", cfg.num_kv_heads), cfg.head_dim, kv_dtype)


def plan_memory(config: EngineConfig, model: nn.Module, weight_bytes: int, kv_dtype: torch.dtype,
                max_model_len: int, device: torch.device, profile: bool = True,
                draft_bytes_per_token: int = 0) -> MemoryBudget:
    """Size the KV cache: `kv_cache_memory` when given, else the memory share left after weights and
    the activation peak (profiled unless `profile` is False: a parallel forward needs every rank).

    `draft_bytes_per_token`: a draft model's cache takes as many blocks as the target's (it holds the
    same requests' tokens), so each block of the budget pays for both."""
    c = config
    per_token = kv_bytes_per_token(model, kv_dtype) + draft_bytes_per_token
    activations = None
    if c.kv_cache_memory is not None:
        kv_bytes = int(c.kv_cache_memory)
    else:
        activations = profile_activations(model, min(c.max_num_batched_tokens, max_model_len), device) if profile else 0
        if device.type == "cuda":
            total = torch.cuda.mem_get_info(device)[1]
            kv_bytes = int(total * c.gpu_memory_utilization) - torch.cuda.memory_allocated(device) - activations
        else:
            kv_bytes = int(available_memory(device) * c.cpu_memory_utilization) - activations
        # more than every seat filled to max_model_len is never needed
        kv_bytes = min(kv_bytes, per_token * c.max_num_seqs * max_model_len)
    num_blocks = kv_bytes // (per_token * c.block_size)
    if num_blocks < 1:
        raise InvalidRequestError(
            f"KV cache budget of {kv_bytes} bytes holds no block of {c.block_size} tokens "
            f"({per_token * c.block_size} bytes); raise kv_cache_memory"
        )
    return MemoryBudget(weight_bytes, activations, num_blocks * per_token * c.block_size,
                        per_token - draft_bytes_per_token, num_blocks, c.block_size, max_model_len,
                        str(kv_dtype).removeprefix("torch."), draft_bytes_per_token)


@torch.inference_mode()
def profile_activations(model: nn.Module, num_tokens: int, device: torch.device) -> int:
    """Peak extra memory of one forward over `num_tokens` (one long sequence, no cache)."""
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata.for_prefill([num_tokens], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        h = model(ids, pos, meta)
        model.compute_logits(h[-1:])
        return torch.cuda.max_memory_allocated(device) - base
    before = peak_rss()
    h = model(ids, pos, meta)
    model.compute_logits(h[-1:])
    del h
    trim_heap()  # the profile's buffers go back to the OS: resident memory follows the load
    # ru_maxrss only grows: this is a lower bound when an earlier peak was higher.
    return max(peak_rss() - before, 0)
