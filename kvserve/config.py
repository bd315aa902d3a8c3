"""Configuration dataclasses: one per concern."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kvserve.errors import InvalidRequestError


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # auto: the model's dtype
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on CUDA, float32 on CPU
# the loader's other spellings of DTYPES
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
PREEMPTION_MODES = ("recompute", "swap", "auto")
SCHEDULING_POLICIES = ("fcfs", "priority", "lpf", "mlfq")  # engine/policy.py
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")  # layers/attention/registry.py
SPECULATIVE_METHODS = ("ngram", "draft_model", "self_quant")  # spec_decode/


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16' (the loader's aliases); other names unchanged."""
    return DTYPE_ALIASES.get(name, name)


def arg(default: Any, *, help: str, choices: tuple[str, ...] | None = None, flag: bool = True,
        aliases: tuple[str, ...] = (), group: str = "engine", type: Callable[[str], Any] | None = None) -> Any:
    """A config field with its command-line description (read by kvserve/entrypoints/cli.py).

    flag: False keeps the field off the command line; aliases: extra option strings ("-q");
    group: "engine" or "parallel" (the subcommands that take parallel flags add that group);
    type: the CLI's parser of the value when it is not the annotation's (int, float, str).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "aliases": aliases,
                                            "group": group, "type": type})


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


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's option shape: {"method": "ngram", "num_speculative_tokens": k, ...}.

    ngram (prompt lookup): the last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
    are looked up in the prompt and output so far, and up to k tokens that followed are proposed.
    draft_model: a smaller model with the same tokenizer (`model`: its GGUF file or HF directory, loaded
    in its own format unless `quantization` says otherwise) drafts k tokens greedily on its own KV cache.
    self_quant: the draft is the target's own checkpoint on the native quantized path (a quantized GGUF
    in its own formats, a float checkpoint as int4, or `quantization`); for a float target.
    draft_layers: the draft keeps only its first N layers (then its final norm and LM head): a layer-skip
    draft, cheaper per token and less often right.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # draft lengths chosen per step from measured step times and each request's acceptance, up to
    # num_speculative_tokens (spec_decode/adaptive.py); False: always as long as the proposer finds
    adaptive: bool = True
    model: str | None = None  # draft_model: the draft's checkpoint
    quantization: str | None = None  # draft_model / self_quant: the draft's weights (None: the method's default)
    draft_layers: int | None = None  # draft_model / self_quant: run only the draft's first N layers

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a dict or its JSON text; raises InvalidRequestError naming the problem."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequestError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"speculative_config must be a JSON object, got {value!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise InvalidRequestError(f"speculative_config: unknown field(s) {', '.join(map(str, unknown))} "
                                      f"(known: {', '.join(sorted(names))})")
        if "method" not in value:
            raise InvalidRequestError(f"speculative_config needs a method (one of {', '.join(SPECULATIVE_METHODS)})")
        if "num_speculative_tokens" not in value:
            raise InvalidRequestError("speculative_config needs num_speculative_tokens (an integer >= 1)")
        cfg = cls(**value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidRequestError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                                      f"got {self.method!r}")
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidRequestError(f"speculative_config.{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.adaptive, bool):
            raise InvalidRequestError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")
        if self.num_speculative_tokens > 32:
            raise InvalidRequestError(f"speculative_config.num_speculative_tokens must be <= 32, got "
                                      f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidRequestError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                                      f"prompt_lookup_max ({self.prompt_lookup_max})")
        model_methods = ("draft_model", "self_quant")
        if self.method == "draft_model" and not isinstance(self.model, (str, os.PathLike)):
            raise InvalidRequestError("speculative_config: draft_model needs \"model\", the draft's GGUF file or HF "
                                      "directory (a smaller model with the target's tokenizer)")
        if self.method != "draft_model" and self.model is not None:
            raise InvalidRequestError(f"speculative_config.model is for method draft_model, not {self.method}")
        if self.quantization is not None and (self.method not in model_methods or self.quantization
                                              not in QUANTIZATIONS):
            raise InvalidRequestError(f"speculative_config.quantization must be one of {', '.join(QUANTIZATIONS)} "
                                      f"with method draft_model or self_quant, got {self.quantization!r}")
        if self.draft_layers is not None:
            v = self.draft_layers
            if self.method not in model_methods or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"speculative_config.draft_layers must be an integer >= 1 with method "
                                          f"draft_model or self_quant, got {v!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Engine arguments, named as vLLM names them; the `kvserve` flags are made from these fields.

    `EngineConfig.from_kwargs(**kw).resolve()` checks every value once and returns the resolved,
    frozen config (dtype "auto" made concrete, byte sizes as ints).
    """

    model: str | None = arg(None, help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M)")
    dtype: str = arg("auto", choices=DTYPES, type=canonical_dtype,
                     help="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    device: str = arg("cpu", help="torch device: cpu, cuda, cuda:1, ...")
    quantization: str = arg("auto", choices=QUANTIZATIONS, aliases=("-q",),
                            help="auto (default): a quantized GGUF runs in its own formats on a CPU with the native "
                                 "kernels (gguf), a float checkpoint stays float; none: float weights; gguf: each "
                                 "layer in its GGUF format (Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/Q8_0; other types requantized); "
                                 "int8: W8A8; int4: W4A8 (Q4_1-style groups of 32); gguf/int8/int4 are CPU only")
    block_size: int = arg(16, help="tokens per KV cache block")
    max_num_seqs: int = arg(256, help="sequences scheduled in one step at most")
    max_num_batched_tokens: int | None = arg(None, help="tokens computed in one step at most (prompt chunks + decodes; "
                                                        "default 512 on a CPU, where the GEMMs run at full speed from "
                                                        "there and activations stay small, 2048 on a GPU)")
    max_model_len: int | None = arg(None, help="longest prompt + output in tokens (default: the model's own limit)")
    kv_cache_memory: int | str | None = arg(None, help="KV cache size, e.g. 2GiB (default: share of free memory)")
    cpu_memory_utilization: float = arg(0.25, help="share of available RAM for the KV cache (CPU), in (0, 1]")
    gpu_memory_utilization: float = arg(0.9, help="share of the GPU's memory for weights, activations and the "
                                                  "KV cache, in (0, 1]")
    kv_cache_dtype: str = arg("auto", choices=KV_CACHE_DTYPES,
                              help="auto: the model's dtype; int8: per-token, per-head float32 scales "
                                   "(1.9x the tokens of bfloat16 at head_dim 64)")
    enable_prefix_caching: bool = arg(True, help="reuse the cached KV blocks of a shared prompt prefix")
    prefix_cache_memory: int | str = arg("64MiB", help="CPU: KV memory that cached prefixes of finished requests may "
                                                       "keep committed beyond the peak the running requests needed; "
                                                       "past it a cached block is reused before a new page is touched "
                                                       "(a GPU cache is allocated whole: no limit)")
    preemption_mode: str = arg("recompute", choices=PREEMPTION_MODES,
                               help="when the KV cache is full: recompute (drop and prefill again later), swap "
                                    "(to host memory, --swap-space), auto (swap long requests, recompute short)")
    swap_space: int | str = arg("1GiB", help="host memory for swapped-out KV blocks")
    scheduling_policy: str = arg("fcfs", choices=SCHEDULING_POLICIES,
                                 help="order of admission and preemption: fcfs, priority (lower first), "
                                      "lpf (length-predicted first), mlfq (skip-join multi-level feedback queue)")
    scheduling_max_wait: float | None = arg(None, help="aging: seconds of waiting after which a request outranks "
                                                       "all others (lpf, mlfq default 30)")
    num_threads: int | None = arg(None, help="CPU threads (default: torch's choice, one fewer for each core other "
                                              "processes take while they do; a number fixes the count)")
    seed: int = arg(0, flag=False, help="engine seed (no flag: --seed is the sampling seed of generate and chat)")
    attention_backend: str = arg("auto", choices=ATTENTION_BACKENDS,
                                 help="auto: Triton kernels on CUDA when triton is installed, the native kernels (cpu) on a CPU "
                                      "that has them, else torch (the SDPA reference)")
    enforce_eager: bool = arg(False, help="no decode CUDA graphs (they need CUDA and the triton backend)")
    speculative_config: dict[str, Any] | str | SpeculativeConfig | None = arg(
        None, type=str, help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3, '
                             '"prompt_lookup_max": 4, "prompt_lookup_min": 1}\' (ngram: prompt lookup; '
                             'draft_model: {"model": PATH} drafts with a smaller model of the same tokenizer; '
                             'self_quant: a float target drafts with its own weights quantized, "draft_layers": N '
                             'keeps its first N layers; greedy and sampled requests speculate, constrained ones '
                             'decode one token at a time; draft lengths adapt to the measured step cost unless '
                             '"adaptive": false)')
    structured_outputs_jump_forward: bool = arg(
        True, help="structured outputs: append the tokens a grammar forces (a JSON key, a closing brace) "
                   "without a step of their own; they are computed in the next step with the token after them")
    # parallelism (kvserve/distributed): one engine over tensor x pipeline ranks
    tensor_parallel_size: int = arg(1, group="parallel", aliases=("-tp",), help="split each layer over N processes")
    pipeline_parallel_size: int = arg(1, group="parallel", aliases=("-pp",), help="split the layers into M stages")
    distributed_init_method: str | None = arg(None, group="parallel",
                                              help="rendezvous, e.g. tcp://HOST:PORT (default: torchrun's "
                                                   "MASTER_ADDR/PORT env, else loopback)")
    nnodes: int = arg(1, group="parallel", help="machines the tensor x pipeline ranks span")
    node_rank: int = arg(0, group="parallel", help="this machine's index; node 0 runs the engine")
    distributed_timeout: float = arg(60.0, group="parallel",
                                     help="seconds a collective may take before the engine reports a failed worker")
    worker_heartbeat_timeout: float = arg(10.0, group="parallel",
                                          help="seconds without a heartbeat from a local worker process before it "
                                               "counts as hung and the engine fails (0: off)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """EngineConfig(**kwargs), rejecting names that are not engine arguments (not yet resolved)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidRequestError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def resolve(self) -> EngineConfig:
        """Check every field once; return a copy with dtype "auto" resolved (bfloat16 on CUDA, float32 on
        CPU), kv_cache_memory and swap_space in bytes (ints) and None quantization as the default, "auto".

        Raises InvalidRequestError with a one-line message for the first bad value. Idempotent.
        """
        import torch

        def bad(name: str, want: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
            if value not in options:
                raise InvalidRequestError(f"{name} must be one of {', '.join(options)}, got {value!r}")
            return value

        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(name, f"an integer >= {low}" + (" or None" if optional else ""))

        def number(name: str, at_most_one: bool = False, optional: bool = False) -> float | None:
            v = getattr(self, name)
            if optional and v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 \
                    or (at_most_one and v > 1):
                want = "a number in (0, 1]" if at_most_one else "a number > 0"
                raise bad(name, want + (" or None" if optional else ""))
            return float(v)

        def byte_size(name: str, low: int, optional: bool = False) -> int | None:
            v = getattr(self, name)
            if optional and v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise bad(name, "a byte size such as 2GiB or 1000000")
            try:
                n = parse_bytes(v)
            except (ValueError, OverflowError):
                raise InvalidRequestError(f"{name}: cannot parse {v!r} (a byte size such as 2GiB or 1000000)") from None
            if n < low:
                raise InvalidRequestError(f"{name} must be a byte size >= {low}, got {v!r}")
            return n

        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise bad("model", "a path or None")
        model = None if self.model is None else os.fspath(self.model)
        device = self.device
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise bad("device", "a torch device such as cpu or cuda:0") from None
        if not isinstance(device, str):
            device = str(dev)
        dtype = self.dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        dtype = choice("dtype", canonical_dtype(dtype) if isinstance(dtype, str) else dtype, DTYPES)
        if dtype == "auto":
            dtype = "bfloat16" if dev.type == "cuda" else "float32"
        quantization = choice("quantization", "auto" if self.quantization is None else self.quantization, QUANTIZATIONS)
        for name in ("block_size", "max_num_seqs"):
            integer(name, 1)
        integer("max_num_batched_tokens", 1, optional=True)
        max_num_batched_tokens = self.max_num_batched_tokens or (512 if dev.type == "cpu" else 2048)
        integer("max_model_len", 0, optional=True)  # 0 or None: the model's own limit
        integer("num_threads", 0, optional=True)  # 0 or None: torch's choice
        kv_cache_memory = byte_size("kv_cache_memory", 1, optional=True)
        swap_space = byte_size("swap_space", 0)
        prefix_cache_memory = byte_size("prefix_cache_memory", 0)
        cpu_util = number("cpu_memory_utilization", at_most_one=True)
        gpu_util = number("gpu_memory_utilization", at_most_one=True)
        choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        for name in ("enable_prefix_caching", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        max_wait = number("scheduling_max_wait", optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "an integer")
        choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
            integer(name, 1)
        integer("node_rank", 0)
        if self.distributed_init_method is not None and not isinstance(self.distributed_init_method, str):
            raise bad("distributed_init_method", "a URL such as tcp://HOST:PORT or None")
        timeout = number("distributed_timeout")
        heartbeat = self.worker_heartbeat_timeout
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not 0 <= heartbeat < float("inf"):
            raise bad("worker_heartbeat_timeout", "a number of seconds >= 0 (0: off)")
        self.parallel_config().validate()  # node_rank < nnodes, ranks a multiple of nodes
        spec = None if self.speculative_config is None else SpeculativeConfig.parse(self.speculative_config)
        if spec is not None and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise InvalidRequestError("speculative_config is not supported with tensor or pipeline parallelism yet")
        return replace(self, model=model, device=device, dtype=dtype, quantization=quantization,
                       max_num_batched_tokens=max_num_batched_tokens,
                       kv_cache_memory=kv_cache_memory, swap_space=swap_space,
                       prefix_cache_memory=prefix_cache_memory, cpu_memory_utilization=cpu_util,
                       gpu_memory_utilization=gpu_util, scheduling_max_wait=max_wait, distributed_timeout=timeout,
                       speculative_config=spec)

    def parallel_config(self):  # -> kvserve.distributed.parallel_state.ParallelConfig
        from kvserve.distributed.parallel_state import ParallelConfig

        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, 1, self.distributed_init_method,
                              self.nnodes, self.node_rank, self.distributed_timeout,
                              float(self.worker_heartbeat_timeout))


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
