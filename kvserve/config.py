"""Configuration dataclasses: one per concern."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # auto: the model's dtype


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, resolved from GGUF metadata or a HF config.json."""

    architecture: str  # registry key: "llama", "qwen2", "qwen3", "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    hidden_act: str = "silu"
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class EngineConfig:
    """Engine arguments, named as vLLM names them."""

    model: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU | float32 | bfloat16 | float16
    device: str = "cpu"
    quantization: str = "none"  # none | int8 (W8A8, CPU) | auto (int8 for an already-quantized GGUF on CPU)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's own limit
    kv_cache_memory: int | str | None = None  # bytes or "2GiB"; default: a fraction of free memory
    cpu_memory_utilization: float = 0.25  # share of available RAM for the KV cache (CPU)
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | float32 | bfloat16 | float16 | int8 (with scales)
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # recompute | swap | auto (swap long requests, recompute short)
    swap_space: int | str = "1GiB"  # host pool for swap preemption
    scheduling_policy: str = "fcfs"  # fcfs | priority | lpf | mlfq (engine/policy.py)
    scheduling_max_wait: float | None = None  # aging bound in seconds; None: the policy's default
    num_threads: int | None = None
    seed: int = 0
    attention_backend: str = "auto"  # auto (triton on CUDA when installed) | torch | triton
    enforce_eager: bool = False  # no decode CUDA graphs (they need CUDA and the triton backend)
    # parallelism (kvserve/distributed): one engine over tensor x pipeline ranks
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_init_method: str | None = None  # default: torchrun's env, else loopback
    nnodes: int = 1
    node_rank: int = 0
    distributed_timeout: float = 60.0  # seconds a collective may take before the engine fails

    def parallel_config(self):  # -> kvserve.distributed.parallel_state.ParallelConfig
        from kvserve.distributed.parallel_state import ParallelConfig

        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, 1, self.distributed_init_method,
                              self.nnodes, self.node_rank, self.distributed_timeout)


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    low = s.lower()
    for u in sorted(units, key=len, reverse=True):
        if low.endswith(u):
            return int(float(low[: -len(u)]) * units[u])
    return int(float(low))
