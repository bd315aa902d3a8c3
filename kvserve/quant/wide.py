"""Weight-only 5-, 6- and 8-bit linear method for CPUs: the GGUF formats wider than 4 bits (Q5_K,
Q6_K, Q8_0) run on their own codes (kernels/cpu/gemm_wide.c).

Each row's weights carry an fp16 scale s and minimum m per 16 inputs, w = s * u + m with unsigned
codes u (kvserve.quant.gguf.BlockParts); activations are quantized per token and group of 32 to
int8 inside each call and each half group's integer dot product is exact, so a token's result
does not depend on its batch.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as native
from kvserve.kernels.cpu.ops import WIDE_HIGH_BITS
from kvserve.quant.gguf import BlockParts

GROUP = native.GROUP


def reference_wide_gemm(x: torch.Tensor, parts: BlockParts) -> torch.Tensor:
    """The kernel's arithmetic in torch (float64): per half group, scale x (s * exact int dot + m * sum of codes)."""
    from kvserve.quant.int8 import quantize_groups

    p = parts.per16()
    xq, dx = quantize_groups(x)  # [M, G, 32] integer-valued, [M, G]
    n, k = p.codes.shape
    g = xq.shape[1]
    qh = torch.nn.functional.pad(p.codes.double(), (0, g * GROUP - k)).view(n, 2 * g, 16)
    xh = xq.double().reshape(x.shape[0], 2 * g, 16)
    isum = torch.einsum("mhk,nhk->mnh", xh, qh)
    per_half = isum * p.scale.double().unsqueeze(0) + xh.sum(-1).unsqueeze(1) * p.minimum.double().unsqueeze(0)
    return (per_half.view(x.shape[0], n, g, 2).sum(-1) * dx.double().unsqueeze(1)).sum(-1).float()


class WideWeight:
    """An [N, K] weight of 5-, 6- or 8-bit codes with an fp16 scale and minimum per 16 inputs."""

    def __init__(self, parts: BlockParts) -> None:
        if parts.bits not in WIDE_HIGH_BITS:
            raise ValueError(f"{parts.bits}-bit codes are not a wide format (5, 6 or 8)")
        self.parts = parts.per16()
        self.bits = parts.bits
        self.out_features, self.in_features = parts.shape
        self.native = native.available()
        if self.native:
            p = self.parts
            g = -(-self.in_features // GROUP)
            pad = 2 * g - p.scale.shape[1]  # a partial last group: its missing half weighs nothing
            s, m = (torch.nn.functional.pad(t, (0, pad)) for t in (p.scale, p.minimum))
            self.q = native.pack_wide(p.codes, s, m, self.bits)
            self.parts = None  # the packed copy is all the kernel reads
        else:
            self.q = None

    @property
    def nbytes(self) -> int:
        if self.q is not None:
            return self.q.numel()
        return self.parts.codes.numel() + 2 * (self.parts.scale.numel() + self.parts.minimum.numel())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W^T (+ bias) [..., N] in x's dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        if self.native:
            y = native.wide_gemm(x2, self.q, self.out_features, self.bits)
        else:
            y = reference_wide_gemm(x2, self.parts)
        if bias is not None:
            y += bias
        y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
