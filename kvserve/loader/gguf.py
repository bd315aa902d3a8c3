"""GGUF files: metadata, model config, tensors (raw and dequantized), read with the `gguf` package."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvserve.config import ModelConfig
from kvserve.errors import ModelLoadError, UnsupportedModelError
from kvserve.loader.gguf_reader import GGUFFormatError, GGUFReader
from kvserve.models.registry import resolve_architecture
from kvserve.quant.gguf import BlockParts, dequantize_torch

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# Tensor types we can turn into floats (gguf.quants implements the block formats).
DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}


class GGUFFile:
    """One GGUF file. Metadata values are plain Python; tensors stay memory-mapped until asked for."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(self.path, "no such file")
        if not self.path.is_file():
            raise ModelLoadError(self.path, "not a file")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(self.path, "not a GGUF file (bad magic bytes)")
        try:
            self.reader = GGUFReader(self.path)
        except (GGUFFormatError, ValueError, OSError) as e:
            raise ModelLoadError(self.path, f"truncated or corrupt GGUF ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{key}", default)

    def model_config(self) -> ModelConfig:
        arch = resolve_architecture(self.architecture or "<missing general.architecture>", self.path)

        def need(key: str) -> Any:
            v = self.arch_get(key)
            if v is None:
                raise ModelLoadError(self.path, f"missing metadata {self.architecture}.{key}")
            return v

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        kv_heads = self.arch_get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            kv_heads = kv_heads[0]
        head_dim = int(self.arch_get("attention.key_length", hidden // heads))
        vocab = self.arch_get("vocab_size")
        if vocab is None:
            vocab = len(self.get("tokenizer.ggml.tokens", []))
        rope_dim = self.arch_get("rope.dimension_count", head_dim)
        scaling = None
        scaling_type = self.arch_get("rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise UnsupportedModelError(self.path, f"RoPE scaling type {scaling_type!r} is not supported")
            scaling = {"rope_type": "linear", "factor": float(self.arch_get("rope.scaling.factor"))}
        eps = self.arch_get("attention.layer_norm_rms_epsilon", self.arch_get("attention.layer_norm_epsilon", 1e-5))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            intermediate_size=int(need("feed_forward_length")),
            max_position_embeddings=int(self.arch_get("context_length", 2048)),
            norm_eps=float(eps),
            rope_theta=float(self.arch_get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            partial_rotary_factor=float(rope_dim) / head_dim,
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            hidden_act="gelu_new" if arch == "gpt2" else "silu",
            name=str(self.get("general.name", self.path.stem)),
        )

    def num_params(self) -> int:
        """Elements of all tensors, from the header (nothing dequantized)."""
        return sum(int(t.n_elements) for t in self.reader.tensors)

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def has_quantized_weights(self) -> bool:
        """True if any 2-D weight is stored in a quantized block format (not F32/F16/BF16)."""
        return any(len(t.shape) == 2 and t.tensor_type.name not in ("F32", "F16", "BF16", "F64")
                   for t in self.tensors.values())

    def four_bit_weights(self) -> bool:
        """True if the layers' 2-D weights are mostly stored in a 4-bit block format (Q4_0, Q4_1, ...)."""
        kinds = [t.tensor_type.name for t in self.tensors.values() if len(t.shape) == 2 and t.name.startswith("blk.")]
        return bool(kinds) and sum(k.startswith(("Q4", "IQ4")) for k in kinds) * 2 > len(kinds)

    def raw_tensor(self, name: str) -> tuple[str, np.ndarray]:
        """The stored bytes (or floats) of a tensor and its type name, for native quantized kernels."""
        t = self.tensors[name]
        return t.tensor_type.name, t.data

    def dequantize(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors[name]
        qtype = t.tensor_type.name
        if qtype not in DEQUANT_TYPES:
            raise UnsupportedModelError(self.path, f"tensor {name} has unsupported type {qtype}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        fast = dequantize_torch(t.data, qtype, shape)
        if fast is not None:
            return fast
        if qtype == "F32":
            arr = np.array(t.data)  # copy: the mapping is read-only
        else:
            arr = dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))

    def native_parts(self, name: str) -> BlockParts | None:
        """A 2-D weight stored in a format a native kernel runs as is (Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/Q8_0, and
        Q3_K/Q2_K on the 5-bit kernel), else None."""
        from kvserve.quant.gguf import native_parts

        t = self.tensors[name]
        return native_parts(t.data, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist())))

    def forget_vocabulary(self) -> None:
        """Drop the parsed vocabulary fields (~10^5 strings) once the tokenizer is built, and the
        file pages parsing touched."""
        for key in [k for k in self.reader.fields if k.startswith("tokenizer.ggml.")]:
            del self.reader.fields[key]
        self._drop_pages(0, None)

    def release(self, name: str) -> None:
        """Drop the file pages of a tensor already read from this process's memory (they stay in the
        OS page cache, and a later read maps them again): a load never holds the whole mapped file
        resident beside the weights."""
        t = self.tensors[name]
        self._drop_pages(int(t.data_offset), int(t.n_bytes))

    def _drop_pages(self, offset: int, size: int | None) -> None:
        mm = self.reader.mm
        if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = len(mm) if size is None else min(offset + size, len(mm))
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def int8_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2-D tensor as int8 rows with one scale each (quant.int8.quantize_rows), decoded a few
        thousand rows at a time: a vocabulary table never exists in float32 (SmolLM2: 113 MB)."""
        from gguf.quants import dequantize

        from kvserve.quant.int8 import ROWS_PER_CHUNK, quantize_rows

        t = self.tensors[name]
        n, k = (int(x) for x in reversed(t.shape.tolist()))
        raw = np.asarray(t.data).reshape(n, -1)
        q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.float32)
        for r in range(0, n, ROWS_PER_CHUNK):
            part = raw[r : r + ROWS_PER_CHUNK]
            rows = dequantize_torch(part, t.tensor_type.name, (len(part), k))
            if rows is None:
                rows = torch.from_numpy(np.require(dequantize(part, t.tensor_type), np.float32, ("C", "W")))
            q[r : r + len(part)], scale[r : r + len(part)] = quantize_rows(rows.reshape(len(part), k))
        return q, scale

    def weights(self, cfg: ModelConfig, native: bool = False,
                int8_tables: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name in HF convention, float tensor) for every model tensor; with `native`, a
        layer's weight in a native kernel's format also carries its codes and scales as `tensor.gguf_parts`.
        With `int8_tables` the token embedding and LM head come as `tensor.int8_rows` on an untouched
        float placeholder (never read: quantizing takes the rows; see load_model)."""
        names = _GPT2_NAMES if cfg.architecture == "gpt2" else _LLAMA_NAMES
        for gname in self.tensors:
            if gname == "rope_freqs.weight":
                continue
            base, _, suffix = gname.rpartition(".")  # suffix: weight / bias
            parts = base.split(".")
            if parts[0] == "blk":
                layer, key = parts[1], ".".join(parts[2:])
                if key not in names:
                    raise UnsupportedModelError(self.path, f"unexpected tensor {gname}")
                prefix = "transformer.h" if cfg.architecture == "gpt2" else "model.layers"
                hf = f"{prefix}.{layer}.{names[key]}.{suffix}"
            else:
                if base not in names:
                    raise UnsupportedModelError(self.path, f"unexpected tensor {gname}")
                hf = f"{names[base]}.{suffix}"
            if int8_tables and base in ("token_embd", "output") and len(self.tensors[gname].shape) == 2:
                w = torch.empty(tuple(int(x) for x in reversed(self.tensors[gname].shape.tolist())))
                w.int8_rows = self.int8_rows(gname)
                self.release(gname)
                yield hf, w
                continue
            w = self.dequantize(gname)
            # the layers' linears only (GPT-2's are stored transposed; embedding and LM head are not int4)
            blocks = self.native_parts(gname) if native and parts[0] == "blk" and cfg.architecture != "gpt2" else None
            if self.architecture == "llama" and parts[-1] in ("attn_q", "attn_k"):
                heads = cfg.num_heads if parts[-1] == "attn_q" else cfg.num_kv_heads
                w = unpermute_qk(w, heads)
                blocks = None if blocks is None else blocks.rows(lambda t, h=heads: unpermute_qk(t, h))
            if blocks is not None:
                w.gguf_parts = blocks  # the quantized linears take these codes and scales as they are (layers/linear.py)
            if cfg.architecture == "gpt2" and hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                w = w.t()  # GPT-2 model expects HF Conv1D layout [in, out]
            self.release(gname)  # everything above copied what it needs
            yield hf, w

    def rope_freq_factors(self) -> torch.Tensor | None:
        return self.dequantize("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row interleaving llama.cpp's converter applies to Llama q/k (rows per head: pairs -> halves).

    Works on rows of any payload (floats or quantized blocks), since blocks never cross rows.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row order (rows per head: halves -> pairs), the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
