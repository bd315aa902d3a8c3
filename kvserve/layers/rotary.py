"""Rotary position embedding (the "rotate half" layout of the HF checkpoints).

The cos/sin table is built once in float32 for every position up to the model's limit and
indexed by each token's absolute position, so a flat batch of mixed sequences needs no
per-sequence work.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kvserve.errors import UnsupportedModelError
from kvserve.kernels.triton import fused_enabled


def rope_inv_freq(
    rotary_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    freq_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse frequencies, with the scaling variants Llama checkpoints use."""
    # built on the CPU even while a model is constructed under torch.device("meta") (a meta tensor's
    # arithmetic would pull in torch._dynamo, and triton with it: 1.4 s and ~70 MB resident)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))
    if freq_factors is not None:  # GGUF stores Llama-3 scaling as a tensor of per-frequency divisors
        return inv_freq / freq_factors.float()
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError("rope_scaling", f"RoPE scaling type {kind!r} is not supported")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.theta = theta
        self.scaling = scaling
        self.set_freq_factors(None)

    def set_freq_factors(self, freq_factors: torch.Tensor | None) -> None:
        inv_freq = rope_inv_freq(self.rotary_dim, self.theta, self.scaling, freq_factors)
        t = torch.arange(self.max_position, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Not a parameter: rebuilt from the config, never loaded, kept float32.
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T]."""
        if fused_enabled(q):
            from kvserve.kernels.triton.fused import rotary_embedding

            return rotary_embedding(positions, q, k, self.cos_cached, self.sin_cached, self.rotary_dim)
        cos = self.cos_cached[positions].unsqueeze(1)
        sin = self.sin_cached[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        x_rot = x[..., :rd]
        out = (x_rot.float() * cos + _rotate_half(x_rot.float()) * sin).to(x.dtype)
        if rd == self.head_dim:
            return out
        return torch.cat((out, x[..., rd:]), dim=-1)
