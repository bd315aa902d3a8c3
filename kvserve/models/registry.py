"""Architecture name (GGUF `general.architecture` or HF `architectures`) -> model class."""

from __future__ import annotations

from torch import nn

from kvserve.config import ModelConfig
from kvserve.errors import UnsupportedModelError
from kvserve.models.gpt2 import GPT2LMHeadModel
from kvserve.models.llama import LlamaForCausalLM

# Our canonical architecture keys and the classes that implement them.
_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}

# HF `architectures` entries and GGUF architecture names -> canonical key.
ARCH_ALIASES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
}


def resolve_architecture(name: str, source: object) -> str:
    key = ARCH_ALIASES.get(name)
    if key is None:
        supported = sorted({k for k in ARCH_ALIASES if k[0].isupper()})
        raise UnsupportedModelError(source, f"unsupported architecture {name!r} (supported: {', '.join(supported)})")
    return key


def build_model(cfg: ModelConfig) -> nn.Module:
    return _MODELS[cfg.architecture](cfg)
