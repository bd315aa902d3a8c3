"""Attention over a flat batch of tokens with a paged KV cache.

metadata.py  what a step's batch looks like (AttentionMetadata) and the per-step plan type
kv_cache.py  the cache tensors: allocation, block copies, writes, int8 quantization
base.py      AttentionBackend: prepare(meta) -> plan once per step, forward(...) per layer
layer.py     the Attention nn.Module the models use
torch_backend.py  the SDPA reference;  cpu_native.py  the native CPU kernels
registry.py  backends by name; one backend shared by a model's layers
(The Triton backend lives with its kernels in kvserve/kernels/triton/backend.py.)
"""

from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.kv_cache import (
    KV_SCALE_DTYPE,
    KVCache,
    allocate_kv_caches,
    copy_blocks,
    quantize_int8,
    resolve_kv_dtype,
)
from kvserve.layers.attention.layer import Attention
from kvserve.layers.attention.metadata import AttentionMetadata, AttentionPlan
from kvserve.layers.attention.registry import (
    ATTENTION_BACKENDS,
    attention_backend_of,
    make_attention_backend,
    prepare_attention,
    set_attention_backend,
)
from kvserve.layers.attention.torch_backend import TorchAttentionBackend

__all__ = [
    "ATTENTION_BACKENDS", "KV_SCALE_DTYPE", "Attention", "AttentionBackend", "AttentionMetadata", "AttentionPlan",
    "KVCache", "TorchAttentionBackend", "allocate_kv_caches", "attention_backend_of", "copy_blocks",
    "make_attention_backend", "prepare_attention", "quantize_int8", "resolve_kv_dtype", "set_attention_backend",
]
