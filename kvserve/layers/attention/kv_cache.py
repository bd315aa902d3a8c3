"""The paged KV cache tensors of each layer: allocation, block copies, writes and int8 quantization.

(The block bookkeeping — who owns which block, ref counts, prefix hashes — is engine/kv_cache.py.)
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kvserve.config import KV_CACHE_DTYPES
from kvserve.errors import InvalidRequestError

KV_SCALE_DTYPE = torch.float32  # int8 caches: one scale per token per head (what the kernels read)


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype -> the cache tensors' dtype (int8: quantized with scales)."""
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return model_dtype if name == "auto" else getattr(torch, name)


@dataclass
class KVCache:
    """One layer's paged K/V, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    An int8 cache stores ``round(x / scale)`` with one scale per token and head
    (``scale = amax|x| / 127`` over head_dim), kept in ``k_scale``/``v_scale``
    ``[num_blocks, block_size, num_kv_heads]`` (float32); readers dequantize.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by block first (what a block copy must move)."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def read(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks (any index shape), as `dtype`."""
        if not self.quantized:
            return self.k[blocks].to(dtype), self.v[blocks].to(dtype)
        assert self.k_scale is not None and self.v_scale is not None
        k = self.k[blocks].to(dtype) * self.k_scale[blocks].unsqueeze(-1).to(dtype)
        v = self.v[blocks].to(dtype) * self.v_scale[blocks].unsqueeze(-1).to(dtype)
        return k, v

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new K/V rows [T, Hkv, D] at their slots (the flat batch has no padding: every token has one)."""
        for new, cache, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            flat = cache.view(-1, *cache.shape[2:])
            if scales is None:
                flat.index_copy_(0, slot_mapping, new.to(flat.dtype))
            else:
                q, s = quantize_int8(new)
                flat.index_copy_(0, slot_mapping, q)
                scales.view(-1, scales.shape[2]).index_copy_(0, slot_mapping, s)

    def gather(self, block_table: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` K/V rows of one sequence, read through its block table, as `dtype`."""
        nblocks = (length + self.block_size - 1) // self.block_size
        kk, vv = self.read(block_table[:nblocks].long(), dtype)
        return kk.flatten(0, 1)[:length], vv.flatten(0, 1)[:length]

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K and V one token takes in one layer (dtype torch.int8: values plus scales)."""
        if dtype == torch.int8:
            return 2 * num_kv_heads * (head_dim + torch.empty((), dtype=KV_SCALE_DTYPE).element_size())
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> int8 values and one scale per row (symmetric, amax / 127)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(KV_SCALE_DTYPE)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose pages the OS commits as they are first written (a fresh anonymous
    mapping), so a KV cache's resident memory follows the blocks in use rather than the budget;
    torch.zeros writes, and so commits, every page at once.

    The mapping is marked no-huge-page: with transparent huge pages (numpy asks for them on large
    arrays, and some kernels give them to every mapping) the first write to a block commits the
    2 MiB around it, in each layer's K and V, so a 60-tensor cache held ~220 MiB of pages for
    154 MiB of blocks written."""
    nbytes = max(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), 1)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    # the array holds the mapping alive, the tensor the array
    return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8)).view(dtype).view(shape)


def allocate_kv_caches(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
    pin_memory: bool = False,
) -> list[KVCache]:
    """One KVCache per layer; `dtype` torch.int8 makes a quantized cache with per-token, per-head scales."""
    cfg = model.config
    # under tensor / pipeline parallelism a rank holds its KV heads of its layers only
    num_layers = getattr(model, "num_local_layers", cfg.num_layers)
    shape = (num_blocks, block_size, getattr(model, "num_local_kv_heads", cfg.num_kv_heads), cfg.head_dim)

    def buf(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if torch.device(device).type == "cpu" and not pin_memory:
            return lazy_zeros(shape, dtype)
        t = torch.zeros(shape, dtype=dtype, device=device)
        return t.pin_memory() if pin_memory else t

    if dtype == torch.int8:
        return [KVCache(buf(shape, dtype), buf(shape, dtype), buf(shape[:3], KV_SCALE_DTYPE), buf(shape[:3], KV_SCALE_DTYPE))
                for _ in range(num_layers)]
    return [KVCache(buf(shape, dtype), buf(shape, dtype)) for _ in range(num_layers)]


def copy_blocks(src: list[KVCache], dst: list[KVCache], pairs: list[tuple[int, int]]) -> None:
    """Copy whole blocks between two pools (any devices): pairs of (source block, destination block)."""
    src_ids = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    dst_ids = torch.tensor([b for _, b in pairs], dtype=torch.long)
    for s_cache, d_cache in zip(src, dst):
        for s, d in zip(s_cache.tensors(), d_cache.tensors(), strict=True):
            s_idx, d_idx = src_ids.to(s.device), dst_ids.to(d.device)
            d.index_copy_(0, d_idx, s.index_select(0, s_idx).to(d.device, non_blocking=True))
