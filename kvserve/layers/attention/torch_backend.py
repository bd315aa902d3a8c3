"""The reference backend: plain torch SDPA. Correct, not fast; every fast backend is tested against it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.kv_cache import KVCache
from kvserve.layers.attention.metadata import AttentionMetadata, AttentionPlan


@dataclass
class DecodeBatch:
    """The single-token sequences of a batch (decodes), attended together.

    Every decode takes this path, alone or batched, so a sequence's numbers do not depend on
    which path its batch happened to take.
    """

    token_index: torch.Tensor  # [Bd] rows of q/out (one token each)
    seq_index: list[int]  # which sequences they are
    all_tokens: bool  # the batch is decodes only: token_index is 0..Bd-1
    block_tables: torch.Tensor  # [Bd, W] int32
    seq_lens: torch.Tensor  # [Bd] int32
    longest: int
    _tables: dict[int, torch.Tensor] = field(default_factory=dict)
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def tables(self, block_size: int) -> torch.Tensor:
        """[Bd, nblocks] block tables cut to the blocks covering the longest sequence (made once per step)."""
        t = self._tables.get(block_size)
        if t is None:
            t = self._tables[block_size] = self.block_tables[:, : -(-self.longest // block_size)].contiguous()
        return t

    def mask(self, block_size: int) -> torch.Tensor:
        """[Bd, 1, 1, L] True where a key position is inside the sequence (the padded SDPA path)."""
        m = self._masks.get(block_size)
        if m is None:
            length = self.tables(block_size).shape[1] * block_size
            pos = torch.arange(length, device=self.seq_lens.device)
            m = self._masks[block_size] = (pos.unsqueeze(0) < self.seq_lens.unsqueeze(1)).view(-1, 1, 1, length)
        return m


@dataclass
class SequencePlan(AttentionPlan):
    """The torch and native CPU backends' plan: decodes batched, the other sequences one by one."""

    decode: DecodeBatch | None  # None without a KV cache or without single-token sequences
    starts: list[int]  # first row of each sequence in the flat batch
    extend_lens: list[int]  # new tokens of each sequence that is not in `decode` (0 for those that are)


def plan_sequences(meta: AttentionMetadata) -> SequencePlan:
    qlens = meta.query_lens_cpu
    starts = list(itertools.accumulate(qlens, initial=0))[:-1]
    seqs = [i for i, n in enumerate(qlens) if n == 1] if meta.block_tables is not None else []
    if not seqs:
        return SequencePlan(None, starts, list(qlens))
    device = meta.block_tables.device
    all_decode = len(seqs) == len(qlens)
    decode = DecodeBatch(
        token_index=torch.tensor([starts[i] for i in seqs], device=device),
        seq_index=seqs,
        all_tokens=all_decode,
        block_tables=meta.block_tables if all_decode else meta.block_tables[seqs],
        seq_lens=(meta.seq_lens if all_decode else meta.seq_lens[seqs]).to(torch.int32).contiguous(),
        longest=max(meta.seq_lens_cpu[i] for i in seqs),
    )
    extend = [0 if n == 1 else n for n in qlens]
    return SequencePlan(decode, starts, extend)


class TorchAttentionBackend(AttentionBackend):
    """One SDPA call per multi-token sequence; all decodes in one padded, masked SDPA."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> SequencePlan:
        return plan_sequences(meta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata, plan: SequencePlan, scale: float) -> torch.Tensor:
        if kv_cache is not None and meta.slot_mapping is not None:
            kv_cache.write(k, v, meta.slot_mapping)
        dec = plan.decode if kv_cache is not None else None
        if dec is not None and dec.all_tokens:
            return self._decode(q, kv_cache, dec, scale)
        out = torch.empty_like(q)
        if dec is not None:
            out[dec.token_index] = self._decode(q[dec.token_index], kv_cache, dec, scale)
        lens = plan.extend_lens if kv_cache is not None else meta.query_lens_cpu
        for i, (start, n, total) in enumerate(zip(plan.starts, lens, meta.seq_lens_cpu)):
            if n == 0:
                continue
            end = start + n
            if kv_cache is None:
                assert n == total, "without a KV cache every token of a sequence must be new"
                kk, vv = k[start:end], v[start:end]
            else:
                assert meta.block_tables is not None
                kk, vv = kv_cache.gather(meta.block_tables[i], total, q.dtype)
            out[start:end] = _causal_sdpa(q[start:end], kk, vv, scale)
        return out

    @staticmethod
    def _decode(qd: torch.Tensor, kv_cache: KVCache, dec: DecodeBatch, scale: float) -> torch.Tensor:
        """All one-token queries [Bd, H, D] at once over a padded [Bd, L] context gathered from their blocks.

        One SDPA call with the padding masked; GQA is handled by SDPA without repeating K/V.
        (Measured on 2 Zen 4 cores, 64 x 320 tokens: 9 ms per layer, against 10-14 ms for
        hand-written grouped or block-diagonal batched GEMMs.)
        """
        bs = kv_cache.block_size
        tables = dec.tables(bs)
        bd, length = len(dec.seq_index), tables.shape[1] * bs
        num_heads, num_kv_heads, d = qd.shape[1], kv_cache.k.shape[2], qd.shape[2]
        kk, vv = kv_cache.read(tables.long(), qd.dtype)
        kk = kk.view(bd, length, num_kv_heads, d).transpose(1, 2)
        vv = vv.view(bd, length, num_kv_heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd.unsqueeze(2), kk, vv, attn_mask=dec.mask(bs), scale=scale,
                                           enable_gqa=num_kv_heads != num_heads)
        return o.view(bd, num_heads, d)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """n new queries [n, H, D], the last n of `total` positions, over keys/values [total, Hkv, D]."""
    n, total = q.shape[0], k.shape[0]
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    qi, ki, vi = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D], [Hkv, total, D]
    if num_kv_heads != num_heads:
        rep = num_heads // num_kv_heads
        ki = ki.repeat_interleave(rep, dim=0)
        vi = vi.repeat_interleave(rep, dim=0)
    # 4-D (a batch of one): with 3-D inputs torch's CPU SDPA takes its unfused math path
    # (6x slower for a 512-token prompt, measured here)
    qi, ki, vi = qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0)
    if n == 1:
        o = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
    elif n == total:
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
    else:
        # query j sits at absolute position total - n + j and sees keys 0..that position
        qpos = torch.arange(total - n, total, device=q.device).unsqueeze(1)
        kpos = torch.arange(total, device=q.device).unsqueeze(0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=kpos <= qpos, scale=scale)
    return o[0].transpose(0, 1)
