"""Hugging Face model directories: config.json + safetensors (single or sharded), memory-mapped."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvserve.config import ModelConfig
from kvserve.errors import ModelLoadError
from kvserve.models.registry import resolve_architecture


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
        for f in self.weight_files:
            with safe_open(str(f), framework="pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return n

    def weights(self, cfg: ModelConfig, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
        """Every checkpoint tensor; `lazy`: as LazySlices, read only when (and as far as) used."""
        from safetensors import SafetensorError, safe_open

        for f in self.weight_files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, LazySlice(st.get_slice(name)) if lazy else st.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f, f"corrupt safetensors file ({e})") from None
