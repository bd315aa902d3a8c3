"""Weight-and-activation int8 linear method for CPUs (W8A8, per output channel / per token).

Weights are quantized once at load, symmetric per output channel, and packed for the native
VNNI kernel; activations are quantized per token inside each GEMM. The integer dot products
are exact, so a token's logits do not depend on what else is in its batch. Without the
native kernel (no compiler, no AVX-512 VNNI) the same arithmetic runs in torch.
"""

from __future__ import annotations

import torch

from kvserve.config import QUANTIZATIONS as QUANTIZATION_METHODS  # noqa: F401 - the loader reads it here
from kvserve.kernels import cpu as native

ROWS_PER_CHUNK = 4096


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (round(w / scale) int8 [N, K], scale = amax / 127 float32 [N]).
    Done a chunk of rows at a time, so a big table (an LM head) needs no float copy."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for r in range(0, weight.shape[0], ROWS_PER_CHUNK):
        w = weight[r : r + ROWS_PER_CHUNK].detach().float()
        s = w.abs().amax(dim=1) / 127.0
        scale[r : r + len(w)] = s
        q[r : r + len(w)] = torch.round(w / s.clamp_min(1e-30).unsqueeze(1)).clamp_(-127, 127)
    return q, scale


class Int8Weight:
    """An [N, K] float weight as int8 values with one scale per output channel."""

    def __init__(self, weight: torch.Tensor | None = None,
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """From a float weight, or from `rows` = (int8 [N, K], scale [N]) already quantized by
        `quantize_rows` (an int8 embedding table the tied LM head shares), which this takes over:
        the kernel's layout may be written over them."""
        q, self.scale = rows if rows is not None else quantize_rows(weight)
        self.out_features, self.in_features = q.shape
        self.native = native.available()
        self.corr: torch.Tensor | None = None
        if self.native:
            self.q, self.corr = native.pack_weight(q, inplace=True)
        else:
            self.q = q

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.out_features + (self.corr.numel() * 4 if self.corr is not None else 0)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 rows `ids` [...] -> [..., K], read from the packed layout (an embedding lookup)."""
        if not self.native:
            return self.q[ids]
        k4 = -(-self.in_features // native.GROUP) * (native.GROUP // 4)
        blocks = self.q.view(torch.int32).view(-1, k4, 16)
        return blocks[ids // 16, :, ids % 16].view(torch.int8)[..., : self.in_features]

    def dequantize(self) -> torch.Tensor:
        """The float weight this stands for (tests and debugging)."""
        q = unpack(self.q, self.out_features, self.in_features) if self.native else self.q
        return q.float() * self.scale.unsqueeze(1)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W^T (+ bias) [..., N] in x's dtype (computed in int8 x int8 -> int32)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # no copy when already so
        if self.native:
            y = native.qgemm(x2, self.q, self.scale, self.corr)
        else:
            y = reference_qgemm(x2, self.q, self.scale)
        if bias is not None:
            y += bias
        y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def quantize_groups(x: torch.Tensor, group: int = native.GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of float32 [M, K] per row and group of `group` values, as the kernel does it:
    (values as float [M, G, group], zero padded; scales [M, G])."""
    m, k = x.shape
    g = -(-k // group)
    xg = torch.nn.functional.pad(x, (0, g * group - k)).view(m, g, group)
    amax = xg.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xg * inv.unsqueeze(2)), amax / 127.0


def reference_qgemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: exact integer dot products per group (float64), scaled per
    activation group, summed, then scaled per output channel."""
    xq, dx = quantize_groups(x)
    m, g, group = xq.shape
    wg = torch.nn.functional.pad(q.double(), (0, g * group - q.shape[1])).view(-1, g, group)
    isum = torch.einsum("mgk,ngk->mng", xq.double(), wg)  # exact: every term is an integer
    return ((isum * dx.double().unsqueeze(1)).sum(-1) * scale.double().unsqueeze(0)).float()


def unpack(wp: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Invert `kernels.cpu.pack_weight`: [N16, K4, 16, 4] blocks back to [N, K]."""
    n16, k4 = -(-n // 16), -(-k // native.GROUP) * (native.GROUP // 4)
    return wp.view(n16, k4, 16, 4).permute(0, 2, 1, 3).reshape(n16 * 16, k4 * 4)[:n, :k]
