"""The native CPU backend: decode and prefill/extend attention read K/V in place in the paged cache
(`kvserve.kernels.cpu`), no gathers and no GQA copies. Falls back to the torch reference for what
the kernels do not cover (no cache, a head_dim not a multiple of 16, a float16 cache)."""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as native_cpu
from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.kv_cache import KVCache
from kvserve.layers.attention.metadata import AttentionMetadata
from kvserve.layers.attention.torch_backend import SequencePlan, TorchAttentionBackend, plan_sequences


class CPUNativeAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self._torch = TorchAttentionBackend()

    def prepare(self, meta: AttentionMetadata) -> SequencePlan:
        return plan_sequences(meta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata, plan: SequencePlan, scale: float) -> torch.Tensor:
        if kv_cache is None or meta.block_tables is None or not native_cpu.decode_attention_supported(q, kv_cache.k):
            return self._torch.forward(q, k, v, kv_cache, meta, plan, scale)
        if meta.slot_mapping is not None:
            kv_cache.write(k, v, meta.slot_mapping)
        out_dtype = q.dtype
        q = q.to(torch.float32).contiguous()  # the kernels' input (a no-op for float32)
        dec = plan.decode
        if dec is not None and dec.all_tokens:
            return self._decode(q, kv_cache, plan, scale).to(out_dtype)
        out = torch.empty_like(q)
        if dec is not None:
            out[dec.token_index] = self._decode(q[dec.token_index], kv_cache, plan, scale)
        # every multi-token sequence in one native call, reading its context in place
        native_cpu.paged_prefill_attention(q, kv_cache.k, kv_cache.v, kv_cache.k_scale, kv_cache.v_scale,
                                           meta.block_tables, plan.starts, plan.extend_lens, meta.seq_lens_cpu,
                                           scale, out)
        return out.to(out_dtype)

    @staticmethod
    def _decode(qd: torch.Tensor, kv_cache: KVCache, plan: SequencePlan, scale: float) -> torch.Tensor:
        dec = plan.decode
        assert dec is not None
        return native_cpu.paged_decode_attention(qd, kv_cache.k, kv_cache.v, kv_cache.k_scale, kv_cache.v_scale,
                                                 dec.tables(kv_cache.block_size), dec.seq_lens, scale)
