"""The quantization grids of the GGUF block formats kvserve writes: Q8_0, Q4_0, Q4_1 (here, group by
group) and the K-quants Q3_K, Q2_K (quant/kquant.py, super-block by super-block).

Every grid stores w = scale * code + minimum per group of 32 inputs of a row, with unsigned codes
and fp16 scale and minimum, the layout of `quant.gguf.BlockParts`:

- Q4_0 (symmetric): scale d = the group's value of largest magnitude / -8, minimum -8 d, codes 0..15;
- Q4_1 (asymmetric): d = (max - min) / 15, minimum = min, codes 0..15;
- Q8_0 (symmetric): d = max |w| / 127, minimum -128 d, codes 1..255 (the file's int8 + 128).

Scales and minimums are rounded to fp16 *before* the codes are chosen, so the codes are the nearest
on the grid the file really stores. The calibrated methods (gptq.py, awq.py) choose their own codes
on these same grids; `parts_to_blocks` packs them as the file's bytes.

Every grid (`Grid` here, `kquant.KGrid`) offers the same few methods to the methods that choose
codes: `span` (inputs whose grid is chosen together), `fits(k)`, `fit(w, h)` (the scales of a span
of columns, h: their calibration H block or None), `codes`, `assemble`, `rtn`, `dequantize`, `pack`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvserve.quant.gguf import BLOCK_BYTES, QK, BlockParts

FLAT_FORMATS = ("q8_0", "q4_0", "q4_1")  # groups of 32
K_FORMATS = ("q3_k", "q2_k")  # rows must be whole super-blocks of 256 (others take a fallback format)
FORMATS = FLAT_FORMATS + K_FORMATS
# general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_*; Q3_K everywhere the rows allow it is its Q3_K_S)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K": 11}


@dataclass
class GroupFit:
    """A span's scales: w = scale * code + minimum, float32 [N, span / group] holding fp16 values."""

    scale: torch.Tensor
    minimum: torch.Tensor

    def scale_min(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.minimum


@dataclass(frozen=True)
class Grid:
    qtype: str  # GGUF type name: Q8_0, Q4_0, Q4_1
    bits: int
    symmetric: bool
    group: int = QK

    @property
    def qmax(self) -> int:
        return 255 if self.qtype == "Q8_0" else 15

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of one group w [N, group] -> (scale, minimum) [N], float32 holding fp16 values.
        clip (a ratio per row, or one) shrinks the range the grid spans: values beyond it saturate."""
        if self.qtype == "Q4_0":
            lo, hi = w.amin(dim=1) * clip, w.amax(dim=1) * clip
            mx = torch.where(hi >= -lo, hi, lo)  # the value of largest magnitude (the positive one on a tie)
            d = (mx / -8.0).half().float()
            return d, -8.0 * d
        if self.qtype == "Q8_0":
            d = (w.abs().amax(dim=1) * clip / 127.0).half().float()
            return d, -128.0 * d
        lo, hi = w.amin(dim=1) * clip, w.amax(dim=1) * clip
        m = lo.half().float()
        return ((hi - m) / 15.0).half().float(), m

    def codes(self, w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """Nearest codes of w [N, ...] for per-row scale and minimum [N] (a zero scale gives w = minimum = 0)."""
        s = scale.view(-1, *([1] * (w.dim() - 1)))
        m = minimum.view(-1, *([1] * (w.dim() - 1)))
        safe = torch.where(s != 0, s, torch.ones_like(s))
        q = torch.where(s != 0, torch.round((w - m) / safe), torch.full_like(w, self._zero_code()))
        return q.clamp_(self._lowest_code(), self.qmax)

    def _lowest_code(self) -> int:
        return 1 if self.qtype == "Q8_0" else 0  # Q8_0 keeps -127..127 (llama.cpp never writes -128)

    def _zero_code(self) -> float:
        return {"Q4_0": 8.0, "Q8_0": 128.0, "Q4_1": 0.0}[self.qtype]

    def _stored_minimum(self, m: torch.Tensor) -> torch.Tensor:
        """The minimum as the parts keep it: fp16, as the GGUF block stores it."""
        return m.half()

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> BlockParts:
        """Round-to-nearest: float [N, K] (K a multiple of 32) -> BlockParts on this grid; clip: a
        range ratio per group [N, K / 32] (search_clip), default 1 (the group's full range)."""
        n, k = w.shape
        if k % self.group:
            raise ValueError(f"a row of {k} is not whole groups of {self.group}")
        g = w.detach().float().reshape(n * (k // self.group), self.group)
        scale, minimum = self.params(g, 1.0 if clip is None else clip.reshape(-1))
        q = self.codes(g, scale, minimum)
        return BlockParts(self.bits, q.to(torch.uint8).reshape(n, k), scale.half().reshape(n, -1),
                          self._stored_minimum(minimum).reshape(n, -1))

    @property
    def span(self) -> int:
        return self.group

    def fits(self, k: int) -> bool:
        return k % self.group == 0

    def fit(self, w: torch.Tensor, h: torch.Tensor | None = None) -> GroupFit:
        """The scales of w [N, K] group by group: the full range, or with h (H of the K inputs) the
        clipping search_clip picks."""
        n, k = w.shape
        g = w.detach().float().reshape(n * (k // self.group), self.group)
        clip = 1.0 if h is None else search_clip(self, w, h.float()).reshape(-1)
        s, m = self.params(g, clip)
        return GroupFit(s.reshape(n, -1), m.reshape(n, -1))

    def assemble(self, codes: torch.Tensor, fits: list[GroupFit]) -> BlockParts:
        return BlockParts(self.bits, codes, torch.cat([f.scale for f in fits], 1).half(),
                          self._stored_minimum(torch.cat([f.minimum for f in fits], 1)))

    def rtn(self, w: torch.Tensor, h: torch.Tensor | None = None) -> BlockParts:
        """Round-to-nearest, on each group's full range or (with h) its searched clipping."""
        return self.quantize(w, None if h is None else search_clip(self, w, h.float()))

    def dequantize(self, p: BlockParts) -> torch.Tensor:
        return dequantize_parts(p)

    def pack(self, p: BlockParts) -> np.ndarray:
        return parts_to_blocks(p, self.qtype)


@dataclass(frozen=True)
class ZeroPointGrid(Grid):
    """GPTQ's grid: `bits`-bit codes 0..2^bits - 1 with an fp16 scale and an integer zero point per
    group of `group` inputs, w = scale * (code - zero), the grid the GPTQ checkpoint layout holds
    (quant/gptq_format.py). Kept in kvserve's terms as minimum = -zero * scale, in float32: that
    product of an fp16 and a small integer is exact there (not always in fp16), so scale * code +
    minimum is exactly scale * (code - zero).

    Symmetric: zero 2^(bits-1) and the group's value of largest magnitude at code 0 (Q4_0's rule,
    which this is at 4 bits). Asymmetric: scale = (max - min) / (2^bits - 1) over a range that
    includes 0 (up to 4 bits rounded so scale * zero is an fp16 value: `_scale`), zero = round(-min /
    scale). The classic checkpoint stores zero - 1, so a zero of 0 has no code there: a group with
    no weight below about -scale / 2 instead spans [0, max] on 2^bits - 2 steps with zero 1."""

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        lo = (w.amin(dim=1) * clip).clamp(max=0.0)
        hi = (w.amax(dim=1) * clip).clamp(min=0.0)
        if self.symmetric:
            z = float(2 ** (self.bits - 1))
            mx = torch.where(hi >= -lo, hi, lo)
            d = (mx / -z).half().float()
            return d, -z * d
        d = self._scale((hi - lo) / self.qmax)
        z = torch.round(-lo / torch.where(d > 0, d, torch.ones_like(d))).clamp_(0, self.qmax)
        no_low = z == 0
        d = torch.where(no_low, self._scale(hi / (self.qmax - 1)), d)
        z = torch.where(no_low, torch.ones_like(z), z)
        return d, -z * d

    def _scale(self, d: torch.Tensor) -> torch.Tensor:
        """An asymmetric group's fp16 scale. Up to 4 bits it keeps 11 - bits significant bits (at most
        2^-(11 - bits) relative off), so that scale * zero (zero < 2^bits) is an fp16 value too: the
        native kernels, which keep each group's minimum in fp16, then run the codes exactly. 8-bit
        zeros would cost the scale too much precision; those groups keep a full fp16 scale."""
        if self.bits > 4:
            return d.half().float()
        mant, exp = torch.frexp(d.half().float())
        keep = 2.0 ** (11 - self.bits)
        return torch.ldexp(torch.round(mant * keep) / keep, exp).half().float()

    def _lowest_code(self) -> int:
        return 0

    def _zero_code(self) -> float:
        return float(2 ** (self.bits - 1))

    def _stored_minimum(self, m: torch.Tensor) -> torch.Tensor:
        return m.float()

    def fits(self, k: int) -> bool:
        return k % self.group == 0 and k * self.bits % 32 == 0

    def pack(self, p: BlockParts) -> np.ndarray:
        raise ValueError(f"{self.qtype} has no GGUF block format; it is written in the GPTQ layout only")


def gptq_grid(bits: int, symmetric: bool, group: int) -> Grid:
    """The grid of a GPTQ-layout output: Q8_0's and Q4_0's own grids where symmetric (so at group 32 the
    codes equal a GGUF q8_0 / q4_0's), else GPTQ's zero-point grid."""
    if symmetric and bits == 8:
        return Grid("Q8_0", 8, True, group)
    if symmetric and bits == 4:
        return Grid("Q4_0", 4, True, group)
    return ZeroPointGrid(f"GPTQ{bits}{'' if symmetric else 'A'}", bits, symmetric, group)


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 down to 0.6


def search_clip(grid: Grid, w: torch.Tensor, h: torch.Tensor, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per row and group, the range ratio whose rounding error costs the least output on the
    calibration inputs: dw_g H_gg dw_g^T with H_gg the group's diagonal block of H = X^T X (the
    clipping search of AWQ, Lin et al. 2023). Returns ratios [N, K / group]; 1.0 is a candidate."""
    n, k = w.shape
    gs = grid.group
    ng = k // gs
    hb = torch.stack([h[j * gs : (j + 1) * gs, j * gs : (j + 1) * gs] for j in range(ng)]).float()
    wg = w.detach().float().reshape(n * ng, gs)
    best = torch.ones(n, ng)
    best_err = torch.full((n, ng), float("inf"))
    for r in ratios:
        s, m = grid.params(wg, r)
        q = grid.codes(wg, s, m)
        dw = (wg - (q * s.unsqueeze(1) + m.unsqueeze(1))).view(n, ng, gs)
        err = torch.einsum("ngk,gkl,ngl->ng", dw, hb, dw)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    return best


def grid_for(fmt: str):  # noqa: ANN201 - a Grid or a kquant.KGrid
    from kvserve.quant.kquant import KGrid

    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt in K_FORMATS:
        return KGrid(fmt.upper())
    return {"q8_0": Grid("Q8_0", 8, True), "q4_0": Grid("Q4_0", 4, True), "q4_1": Grid("Q4_1", 4, False)}[fmt]


def dequantize_parts(p: BlockParts) -> torch.Tensor:
    """BlockParts -> float32 [N, K]: scale * code + minimum per group."""
    n, k = p.codes.shape
    g = p.scale.shape[1]
    q = p.codes.float().view(n, g, k // g)
    return (q * p.scale.float().unsqueeze(2) + p.minimum.float().unsqueeze(2)).view(n, k)


def parts_to_blocks(p: BlockParts, qtype: str) -> np.ndarray:
    """BlockParts on `qtype`'s grid -> the file's bytes, uint8 [N, K / 32 * block bytes].

    Q4_0 / Q4_1: fp16 d (and m), then 16 bytes whose low nibble is element j and high nibble element
    j + 16; Q8_0: fp16 d and 32 int8 (code - 128). The inverse of quant.gguf.native_parts."""
    n, k = p.codes.shape
    nb = k // QK
    d = p.scale.reshape(n * nb, 1).contiguous().view(torch.uint8).reshape(n * nb, 2)
    codes = p.codes.reshape(n * nb, QK)
    if qtype == "Q8_0":
        body = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        out = torch.cat([d, body], dim=1)
    elif qtype in ("Q4_0", "Q4_1"):
        if int(codes.max()) > 15:
            raise ValueError("4-bit codes out of range")
        nib = (codes[:, :16] | (codes[:, 16:] << 4)).to(torch.uint8)
        head = [d]
        if qtype == "Q4_1":
            head.append(p.minimum.reshape(n * nb, 1).contiguous().view(torch.uint8).reshape(n * nb, 2))
        out = torch.cat([*head, nib], dim=1)
    else:
        raise ValueError(f"cannot pack {qtype}")
    assert out.shape[1] == BLOCK_BYTES[qtype]
    return out.reshape(n, nb * BLOCK_BYTES[qtype]).numpy()
