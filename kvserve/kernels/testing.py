"""Random paged-attention scenarios and the torch references the kernels are checked against.

Shared by the kernel tests (CPU, Triton interpreter) and benchmarks/gpu.py (on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.layers.attention import AttentionMetadata, KVCache, TorchAttentionBackend


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 KV layout's quantizer (the engine's own): one symmetric scale per row of the last dim."""
    from kvserve.layers.attention import quantize_int8 as engine_quantizer

    return engine_quantizer(x)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D] new rows
    v: torch.Tensor
    kv_cache: tuple[torch.Tensor, ...]  # (K, V) or (K, V, K scales, V scales), prefix already filled
    meta: AttentionMetadata


def make_case(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int = 16, dtype: torch.dtype = torch.float32, int8: bool = False,
              seed: int = 0, device: torch.device | str = "cpu") -> PagedCase:
    """Sequences with cached prefixes in shuffled blocks (so paging bugs cannot hide) plus new tokens."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few unused blocks filled with noise
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq)
    tables, at = [], 0
    for nb in blocks_per_seq:
        tables.append(perm[at : at + nb] + [0] * (width - nb))
        at += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g)
    v_cache = torch.randn(shape, generator=g)
    T = sum(query_lens)
    q = torch.randn(T, num_heads, head_dim, generator=g)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g)
    slots = []
    for table, n, total in zip(tables, query_lens, seq_lens):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(total - n, total)]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
    )
    if int8:
        kq, ks = quantize_int8(k_cache)
        vq, vs = quantize_int8(v_cache)
        cache: tuple[torch.Tensor, ...] = (kq.to(device), vq.to(device), ks.to(device), vs.to(device))
    else:
        cache = (k_cache.to(device, dtype), v_cache.to(device, dtype))
    return PagedCase(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cache, meta)


def clone_cache(cache: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in cache)


def torch_reference(case: PagedCase, scale: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The torch backend's output and cache; an int8 cache is written by the torch quantizer and
    attended dequantized, in float32."""
    cache = clone_cache(case.kv_cache)
    if len(cache) == 2:
        out = TorchAttentionBackend().run(case.q, case.k, case.v, KVCache(*cache), case.meta, scale)
        return out, cache
    kq, vq, ks, vs = cache
    slots = case.meta.slot_mapping
    for new, codes, scales in ((case.k, kq, ks), (case.v, vq, vs)):
        c, s = quantize_int8(new)
        codes.view(-1, *codes.shape[2:])[slots] = c
        scales.view(-1, scales.shape[-1])[slots] = s
    deq = (dequantize_int8(kq, ks), dequantize_int8(vq, vs))
    meta = AttentionMetadata(case.meta.query_start_loc, case.meta.seq_lens, case.meta.query_lens_cpu,
                             case.meta.seq_lens_cpu, None, case.meta.block_tables)
    out = TorchAttentionBackend().run(case.q.float(), case.k.float(), case.v.float(), KVCache(*deq), meta, scale)
    return out.to(case.q.dtype), (kq, vq, ks, vs)
