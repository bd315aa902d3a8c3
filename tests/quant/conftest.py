from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_hf, write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama (GQA: 4 heads, 2 KV heads) in an F32 GGUF, with outlier channels as real
    LLMs have them (norm weights and v/up rows scaled by e^(1.2 N(0,1))), so some inputs matter more."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("calib")
    hf = make_tiny_hf(d / "hf", "llama")
    t = load_file(str(hf / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in list(t):
        if name.endswith(("layernorm.weight", "v_proj.weight", "up_proj.weight")):
            scale = torch.exp(1.2 * torch.randn(t[name].shape[0], generator=g))
            t[name] = t[name] * scale.view(-1, *[1] * (t[name].dim() - 1))
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return write_tiny_llama_gguf(hf, d / "tiny.gguf")
