"""Weight-only 4-bit linear method for CPUs (W4A8): GGUF Q4_1's arithmetic, group-wise.

Each row's weights are split in groups of 32 inputs with a scale d and a minimum m (both fp16),
w = d * q + m with q in 0..15. Quantizing an already-Q4_1 GGUF weight this way gives back its
own codes and scales, so the default model runs on exactly the numbers llama.cpp runs on.
Activations are quantized per token and group of 32 to int8 inside each call, and each group's
integer dot product is exact (VPDPBUSD), so a token's result does not depend on its batch.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as native

GROUP = native.GROUP


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (codes uint8 [N, K], d fp16 [N, G], m fp16 [N, G]) by each group's min and max."""
    n, k = w.shape
    g = -(-k // GROUP)
    wf = w.detach().float()
    padded = torch.nn.functional.pad(wf, (0, g * GROUP - k))
    grp = padded.view(n, g, GROUP)
    if g * GROUP != k:  # the padding must not widen the last group's range
        last = grp[:, -1, : k - (g - 1) * GROUP]
        lo_last, hi_last = last.amin(dim=1), last.amax(dim=1)
    lo, hi = grp.amin(dim=2), grp.amax(dim=2)
    if g * GROUP != k:
        lo[:, -1], hi[:, -1] = lo_last, hi_last
    m = lo.half()
    d = ((hi - m.float()) / 15.0).half()
    df = d.float().unsqueeze(2)
    q = torch.where(df > 0, torch.round((grp - m.float().unsqueeze(2)) / torch.where(df > 0, df, 1.0)),
                    torch.zeros_like(grp))
    q = q.clamp_(0, 15).to(torch.uint8).view(n, g * GROUP)[:, :k]
    return q.contiguous(), d, m


def dequantize_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = d.shape[1]
    qf = torch.nn.functional.pad(q.float(), (0, g * GROUP - k)).view(n, g, GROUP)
    return (qf * d.float().unsqueeze(2) + m.float().unsqueeze(2)).view(n, g * GROUP)[:, :k]


def reference_q4gemm(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch (float64): per group, scale x (d * exact int dot + m * sum of codes)."""
    from kvserve.quant.int8 import quantize_groups

    xq, dx = quantize_groups(x)  # [M, G, 32] integer-valued, [M, G]
    n, k = q.shape
    g = xq.shape[1]
    qg = torch.nn.functional.pad(q.double(), (0, g * GROUP - k)).view(n, g, GROUP)
    isum = torch.einsum("mgk,ngk->mng", xq.double(), qg)
    xsum = xq.double().sum(-1)  # [M, G]
    per_group = isum * d.double().unsqueeze(0) + xsum.unsqueeze(1) * m.double().unsqueeze(0)
    return (per_group * dx.double().unsqueeze(1)).sum(-1).float()


class Int4Weight:
    """An [N, K] float weight as 4-bit codes with an fp16 scale and minimum per 32 inputs."""

    def __init__(self, weight: torch.Tensor | None = None,
                 parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """From a float weight (quantized by its groups' min and max), or from `parts` = (codes, d, m)
        as a 4-bit GGUF stores them (kvserve.quant.gguf.q4_parts): then no float round trip."""
        q, self.d, self.m = parts if parts is not None else quantize_q4(weight)
        self.out_features, self.in_features = q.shape
        self.native = native.available()
        self.q = native.pack_q4(q, self.d, self.m) if self.native else q

    @property
    def nbytes(self) -> int:
        return self.q.numel() if self.native else self.q.numel() // 2 + 4 * self.d.numel()

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [N, K] (tests and debugging)."""
        if not self.native:
            return self.q
        n, k = self.out_features, self.in_features
        g = -(-k // GROUP)
        blocks = self.q.view(-(-n // 16), g, native.Q4_GROUP_BYTES)[:, :, :256].reshape(-1, g, 4, 16, 4)
        lo, hi = blocks & 0xF, blocks >> 4  # [N16, G, step, channel, byte]
        steps = torch.cat([lo, hi], dim=2)  # k = step * 4 + byte within the group
        return steps.permute(0, 3, 1, 2, 4).reshape(-1, g * GROUP)[:n, :k]

    def dequantize(self) -> torch.Tensor:
        return dequantize_q4(self.codes(), self.d, self.m)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W^T (+ bias) [..., N] in x's dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        if self.native:
            y = native.q4gemm(x2, self.q, self.out_features)
        else:
            y = reference_q4gemm(x2, self.q, self.d, self.m)
        if bias is not None:
            y += bias
        y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
