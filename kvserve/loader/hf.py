"""Hugging Face model directories: config.json + safetensors (single or sharded), memory-mapped; float
checkpoints or GPTQ ones (quantization_config quant_method "gptq", the layout of quant/gptq_format.py),
whose linears are dequantized to float as they are read."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from kvserve.config import ModelConfig
from kvserve.errors import ModelLoadError
from kvserve.models.registry import resolve_architecture

logger = logging.getLogger(__name__)


class LazySlice:
    """A checkpoint tensor not read yet: `narrow` and row slicing read only the part asked for
    (tensor parallelism: a rank reads its slice of each weight, not the whole)."""

    def __init__(self, sl: Any) -> None:
        self._sl = sl
        self.shape = torch.Size(sl.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        idx = [slice(None)] * len(self.shape)
        idx[dim] = slice(start, start + length)
        return self._sl[tuple(idx)]

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self._sl[key]

    def full(self) -> torch.Tensor:
        return self._sl[:] if len(self.shape) else self._sl[...]


class HFModelDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(path, "not a model directory (no config.json)")
        try:
            self.raw_config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(cfg_file, f"invalid JSON ({e})") from None
        self.weight_files = self._find_weights()
        self.gptq = self._gptq_config()

    def _gptq_config(self) -> dict[str, Any] | None:
        """bits, group_size, sym, desc_act of a GPTQ checkpoint (None: a float one); ModelLoadError for
        the quantized checkpoints kvserve does not read."""
        from kvserve.quant.gptq_format import BITS

        q = self.raw_config.get("quantization_config")
        if q is None:
            return None
        where = self.path / "config.json"
        if q.get("quant_method") != "gptq":
            raise ModelLoadError(where, f"quantization_config quant_method {q.get('quant_method')!r}: "
                                        "kvserve reads GPTQ checkpoints (quant_method 'gptq') only")
        if q.get("checkpoint_format", "gptq") != "gptq":
            raise ModelLoadError(where, f"GPTQ checkpoint_format {q['checkpoint_format']!r}: kvserve reads the "
                                        "classic 'gptq' one (zeros stored minus one) only")
        if q.get("bits") not in BITS:
            raise ModelLoadError(where, f"GPTQ bits {q.get('bits')!r}: kvserve reads {', '.join(map(str, BITS))}")
        return {"bits": int(q["bits"]), "group_size": int(q.get("group_size", -1)), "sym": bool(q.get("sym", True)),
                "desc_act": bool(q.get("desc_act", False))}

    def has_quantized_weights(self) -> bool:
        return self.gptq is not None

    def four_bit_weights(self) -> bool:
        return self.gptq is not None and self.gptq["bits"] == 4

    def describe_quantization(self) -> str:
        g = self.gptq
        group = "per row" if g["group_size"] == -1 else f"groups of {g['group_size']}"
        return f"GPTQ {g['bits']}-bit {'symmetric' if g['sym'] else 'asymmetric'}, {group}"

    def native_blocker(self) -> str | None:
        """Why the native kernels cannot run this GPTQ checkpoint's codes exactly as stored (None: they
        can, every linear): groups that are not whole 32s (16s), or zero * scale products that are not
        fp16 values (the kernels keep each group's minimum in fp16). Reads only zeros and scales."""
        from kvserve.quant.gptq_format import kernel_step, minimum_is_fp16, unpack_zeros

        bits, group = self.gptq["bits"], self.gptq["group_size"]
        if group == -1 or kernel_step(bits, group) is None:
            return f"{self.describe_quantization()}: the native kernels take groups of whole 32s (16s)"
        total = inexact = 0
        with self._open() as where:
            for name, st in where.items():
                sname = name[: -len("qzeros")] + "scales"
                if name.endswith(".qzeros") and sname in where:  # (one without scales fails as it is read)
                    scales = where[sname].get_tensor(sname)
                    minimum = -unpack_zeros(st.get_tensor(name), bits).float() * scales.float().t()
                    total += 1
                    inexact += scales.dtype != torch.float16 or not minimum_is_fp16(minimum)
        if inexact:
            return (f"{self.describe_quantization()}: {inexact} of {total} linears have zero * scale products "
                    "that are not fp16 values, which the native kernels keep")
        return None

    def _find_weights(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(index, f"invalid safetensors index ({e})") from None
            files = [self.path / n for n in names]
            for f in files:
                if not f.exists():
                    raise ModelLoadError(f, "shard listed in model.safetensors.index.json is missing")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise ModelLoadError(self.path, "only pickle weights (*.bin/*.pt) found; kvserve loads safetensors only")
        raise ModelLoadError(self.path, "no weights (*.safetensors) in model directory")

    def model_config(self) -> ModelConfig:
        c = self.raw_config
        archs = c.get("architectures") or [c.get("model_type", "")]
        arch = resolve_architecture(str(archs[0]), self.path / "config.json")
        try:
            if arch == "gpt2":
                hidden = c["n_embd"]
                return ModelConfig(
                    architecture=arch,
                    vocab_size=c["vocab_size"],
                    hidden_size=hidden,
                    num_layers=c["n_layer"],
                    num_heads=c["n_head"],
                    num_kv_heads=c["n_head"],
                    head_dim=hidden // c["n_head"],
                    intermediate_size=c.get("n_inner") or 4 * hidden,
                    max_position_embeddings=c["n_positions"],
                    norm_eps=c.get("layer_norm_epsilon", 1e-5),
                    tie_word_embeddings=c.get("tie_word_embeddings", True),
                    hidden_act=c.get("activation_function", "gelu_new"),
                    name=c.get("_name_or_path", self.path.name),
                )
            heads = c["num_attention_heads"]
            rope = c.get("rope_parameters") or {}
            scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            return ModelConfig(
                architecture=arch,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                intermediate_size=c["intermediate_size"],
                max_position_embeddings=c.get("max_position_embeddings", 2048),
                norm_eps=c.get("rms_norm_eps", 1e-6),
                rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                partial_rotary_factor=float(c.get("partial_rotary_factor", 1.0)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=True if arch == "qwen2" else bool(c.get("attention_bias", False)),
                qk_norm=arch == "qwen3",
                hidden_act=c.get("hidden_act", "silu"),
                name=c.get("_name_or_path", self.path.name),
            )
        except KeyError as e:
            raise ModelLoadError(self.path / "config.json", f"missing field {e}") from None

    def num_params(self) -> int:
        """Elements of all checkpoint tensors, from the safetensors headers (no tensor read)."""
        from safetensors import safe_open

        n = 0
        bits = self.gptq["bits"] if self.gptq else None
        for f in self.weight_files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    if bits and k.endswith(".qweight"):  # [K * bits / 32, N] packed codes of K * N weights
                        n += shape[0] * 32 // bits * shape[1]
                    elif not (bits and k.endswith((".qzeros", ".scales", ".g_idx"))):
                        n += math.prod(shape)
        return n

    def weights(self, cfg: ModelConfig, lazy: bool = False,
                native: bool = False) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
        """Every checkpoint tensor; `lazy`: as LazySlices, read only when (and as far as) used. A GPTQ
        checkpoint's linears come as `<name>.weight`, dequantized to float32 (never lazy), and with
        `native` also carry their codes as `tensor.gguf_parts` where a native kernel runs them exactly
        (layers/linear.py takes them as they are)."""
        if self.gptq is not None:
            yield from self._gptq_weights(native)
            return
        from safetensors import SafetensorError, safe_open

        for f in self.weight_files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, LazySlice(st.get_slice(name)) if lazy else st.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f, f"corrupt safetensors file ({e})") from None

    @contextmanager
    def _open(self) -> Iterator[dict[str, Any]]:
        """{tensor name: the open shard holding it} over every shard: a GPTQ linear's qweight, qzeros and
        scales need not share one."""
        from safetensors import SafetensorError, safe_open

        with ExitStack() as stack:
            where: dict[str, Any] = {}
            for f in self.weight_files:
                try:
                    st = stack.enter_context(safe_open(str(f), framework="pt"))
                except (SafetensorError, OSError) as e:
                    raise ModelLoadError(f, f"corrupt safetensors file ({e})") from None
                where.update(dict.fromkeys(st.keys(), st))
            yield where

    def _gptq_weights(self, native: bool) -> Iterator[tuple[str, torch.Tensor]]:
        from kvserve.quant.gptq_format import from_gptq

        g = self.gptq
        own = (".qweight", ".qzeros", ".scales", ".g_idx")
        linears = dequantized = 0
        with self._open() as where:
            for name, st in where.items():
                if not name.endswith(own):
                    yield name, st.get_tensor(name)
                    continue
                if not name.endswith(".qweight"):
                    continue
                prefix = name[: -len(".qweight")]
                try:
                    if prefix + ".qzeros" not in where or prefix + ".scales" not in where:
                        raise ValueError(f"{prefix}: a qweight without its qzeros and scales")
                    g_idx = where[prefix + ".g_idx"].get_tensor(prefix + ".g_idx") if prefix + ".g_idx" in where else None
                    if g_idx is None and g["desc_act"]:
                        raise ValueError(f"{prefix}: desc_act without a g_idx: the inputs' order is unknown")
                    w, parts = from_gptq(st.get_tensor(name), where[prefix + ".qzeros"].get_tensor(prefix + ".qzeros"),
                                         where[prefix + ".scales"].get_tensor(prefix + ".scales"), g_idx,
                                         g["bits"], g["group_size"], prefix, native)
                except ValueError as e:
                    raise ModelLoadError(self.path, str(e)) from None
                linears += 1
                if parts is not None:
                    w.gguf_parts = parts
                else:
                    dequantized += 1
                yield prefix + ".weight", w
        logger.info("%s: %s, %d linears, %s", self.path.name, self.describe_quantization(), linears,
                    "all run as stored" if native and not dequantized else f"{dequantized} dequantized to float")
