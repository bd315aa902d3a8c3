"""GGUF's 3- and 2-bit K-quants (Q3_K, Q2_K): llama.cpp's block layouts, with codes kvserve chooses.

A row is cut into super-blocks of 256 inputs, each of 16 sub-blocks of 16 inputs with a small
integer scale; one fp16 factor per super-block turns the integers into the sub-blocks' scales:

- Q3_K (110 bytes per 256: 3.4375 bits per weight): w = d (s - 32) (c - 4), codes c in 0..7,
  s in 0..63 (6 bits: a signed scale per sub-block), d fp16;
- Q2_K (84 bytes per 256: 2.625 bits per weight): w = d s c - dmin m, codes c in 0..3, s and m in
  0..15 (4 bits: a scale and a minimum <= 0 per sub-block), d and dmin fp16.

Byte layouts (the `gguf` package's dequantizers are the spec). Element e of a super-block,
written e = 128 h + 32 t + l (h 0..1, t 0..3, l 0..31), has its low two code bits at bits 2t, 2t + 1
of qs[32 h + l]. Q3_K: hmask[32] (bit b of byte l: the third code bit of element 32 b + l),
qs[64], 12 bytes of scales (scale j's low nibble in byte j % 8 at bit 4 (j // 8), its top two bits
in byte 8 + j % 4 at bit 2 (j // 4)), then d. Q2_K: 16 bytes (scale j in the low nibble of byte j,
minimum j in the high nibble), qs[64], d, dmin.

Choosing the codes (`KGrid.fit`), per super-block:
1. each sub-block's float scale (Q2_K: and minimum) by a search over clipping ratios of its range,
   each candidate refined by (weighted) least squares on its own codes;
2. the fp16 factor(s) from those: the sub-block scale of largest magnitude becomes an end of the
   integer range (a few smaller and larger factors are candidates as well);
3. with the factor fixed, each sub-block's integer scale (and minimum) searched on the format's
   own grid around the float one, each candidate with its nearest codes; the factor candidate with
   the least total error wins.
The error is the squared weight error, or with calibration statistics H = X^T X the output error
dw H_b dw^T over the sub-block's diagonal block H_b. The codes are always the nearest on the grid
the file stores (`KGrid.codes`), so plain rounding and GPTQ (which rounds column by column on
fixed scales, gptq.py) choose codes the same way. Dequantized values (`KParts.dequantize`) are
computed in float32 in the order gguf.quants computes them, so they are equal to its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256  # inputs per super-block
SUB = 16  # inputs per sub-block (one integer scale)
K_BYTES = {"Q3_K": QK_K // 8 + QK_K // 4 + 12 + 2, "Q2_K": QK_K // 16 + QK_K // 4 + 2 + 2}
K_BITS = {"Q3_K": 3, "Q2_K": 2}

CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)  # step 1's candidate ranges (Q2_K: each end's)
# Step 2's multiples of the fp16 factor(s) tried and step 3's search radius, per format. On SmolLM2's
# down_proj weights (squared error): Q3_K's 6-bit integers gain most from a wide search (radius 0:
# 0.02236 relative error, 4: 0.02203, 8: 0.02194, all 64 values: 0.02192), other factors add ~0.2%;
# Q2_K's 4-bit scale and minimum gain from both (radius 0, one factor: 0.0724; radius 1, four
# factors: 0.0703; radius 2 or 4 or more factors: < 0.1% better, at two to four times the time).
FACTORS = {"Q3_K": (1.0,), "Q2_K": (1.0, 0.97, 1.03, 0.94)}
RADIUS = {"Q3_K": 8, "Q2_K": 1}


@dataclass
class KParts:
    """A weight [N, K] (K a multiple of 256) as a Q3_K / Q2_K file stores it: codes, per-sub-block
    integer scales (and minimums), per-super-block fp16 factors. Row operations apply to all fields."""

    qtype: str  # "Q3_K" or "Q2_K"
    codes: torch.Tensor  # uint8 [N, K]: Q3_K 0..7, Q2_K 0..3
    d: torch.Tensor  # fp16 [N, K / 256]
    sc: torch.Tensor  # uint8 [N, K / 16]: Q3_K 0..63 (scale d (sc - 32)), Q2_K 0..15 (scale d sc)
    dmin: torch.Tensor  # fp16 [N, K / 256] (Q2_K; zeros for Q3_K)
    mn: torch.Tensor  # uint8 [N, K / 16] (Q2_K: minimum -dmin mn; zeros for Q3_K)

    @property
    def bits(self) -> int:
        return K_BITS[self.qtype]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, fn) -> "KParts":  # noqa: ANN001 - a function of a row-major tensor
        return KParts(self.qtype, fn(self.codes), fn(self.d), fn(self.sc), fn(self.dmin), fn(self.mn))

    def scale_min(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sub-block's (scale, minimum), float32 [N, K / 16], w = scale * code + minimum exactly."""
        return _scale_min(self.qtype, self.d, self.sc, self.dmin, self.mn)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], bit for bit gguf.quants.dequantize of the packed blocks."""
        n, k = self.codes.shape
        s, m = self.scale_min()
        q = self.codes.float().view(n, k // SUB, SUB)
        return (q * s.unsqueeze(2) + m.unsqueeze(2)).view(n, k)


def _scale_min(qtype: str, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor,
               mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    per = sc.shape[-1] // d.shape[-1]  # sub-blocks per super-block (16 in a GGUF file)
    df = d.float().repeat_interleave(per, -1)
    if qtype == "Q3_K":
        s = df * (sc.float() - 32.0)  # exact in float32 (11 x 6 significant bits)
        return s, -4.0 * s  # s c - 4 s = s (c - 4) exactly: both terms and the result are exact
    s = df * sc.float()
    return s, -(dmin.float().repeat_interleave(per, -1) * mn.float())


def _err(dw: torch.Tensor, hb: torch.Tensor | None) -> torch.Tensor:
    """Per sub-block error of dw [N, G, 16]: sum dw^2, or dw H_g dw^T with hb [G, 16, 16]."""
    if hb is None:
        return dw.square().sum(-1)
    return torch.einsum("ngk,gkl,ngl->ng", dw, hb, dw)


def _weighted(a: torch.Tensor, b: torch.Tensor, hb: torch.Tensor | None) -> torch.Tensor:
    """a H_g b^T per sub-block (a^T b without H)."""
    if hb is None:
        return (a * b).sum(-1)
    return torch.einsum("ngk,gkl,ngl->ng", a, hb, b)


def _hblocks(h: torch.Tensor | None, k: int) -> torch.Tensor | None:
    if h is None:
        return None
    g = k // SUB
    return h.float().reshape(g, SUB, g, SUB).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class KGrid:
    """The Q3_K or Q2_K grid; `fit` chooses a super-block's factors and sub-block integers,
    `codes` the nearest codes on them (the interface gptq.py and compress.py use for every grid)."""

    qtype: str
    radius: int | None = None  # step 3 searches integers within this distance of the float estimate
    # inputs per super-block: 256 is the GGUF layout; another multiple of 16 is the same arithmetic
    # with no file layout (benchmarks/compress.py measures a whole 3-bit SmolLM2 that way)
    super_block: int = QK_K

    @property
    def bits(self) -> int:
        return K_BITS[self.qtype]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    group = SUB  # inputs sharing one scale

    @property
    def span(self) -> int:
        """Inputs whose grid is chosen together (a super-block)."""
        return self.super_block

    def fits(self, k: int) -> bool:
        return k % self.super_block == 0

    def codes(self, w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """Nearest codes of w [N, ...] on per-row scale and minimum broadcast against it; a zero scale
        gives the code whose value is the minimum (Q3_K: 4, the zero)."""
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        zero = 4.0 if self.qtype == "Q3_K" else 0.0
        q = torch.where(scale != 0, torch.round((w - minimum) / safe), torch.full_like(w, zero))
        return q.clamp_(0, self.qmax)

    # -- step 1: float sub-block scales ---------------------------------------------------------

    def _float_q3(self, wb: torch.Tensor, hb: torch.Tensor | None) -> torch.Tensor:
        lo, hi = wb.amin(-1), wb.amax(-1)
        ext = torch.where(hi >= -lo, hi, lo)  # the value of largest magnitude: it goes to code -4
        best_s, best_e = torch.zeros_like(ext), torch.full_like(ext, float("inf"))
        for r in CLIP_RATIOS:
            s = -ext * r / 4.0
            for _ in range(2):  # the candidate, then its least-squares scale for its own codes
                q = self.codes(wb, s.unsqueeze(-1), -4.0 * s.unsqueeze(-1)) - 4.0
                e = _err(wb - s.unsqueeze(-1) * q, hb)
                better = e < best_e
                best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
                qq = _weighted(q, q, hb)
                s = torch.where(qq > 0, _weighted(q, wb, hb) / qq.clamp_min(1e-30), s)
        return best_s

    def _float_q2(self, wb: torch.Tensor, hb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = wb.amin(-1).clamp(max=0.0), wb.amax(-1)  # the minimum can only be <= 0
        best_a, best_b = torch.zeros_like(lo), torch.zeros_like(lo)
        best_e = torch.full_like(lo, float("inf"))
        ones = torch.ones_like(wb)
        for r_lo in CLIP_RATIOS:
            for r_hi in CLIP_RATIOS:
                b = -lo * r_lo
                a = ((hi * r_hi - lo * r_lo) / 3.0).clamp_min(0.0)
                for _ in range(2):
                    q = self.codes(wb, a.unsqueeze(-1), -b.unsqueeze(-1))
                    e = _err(wb - (a.unsqueeze(-1) * q - b.unsqueeze(-1)), hb)
                    better = e < best_e
                    best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
                    best_e = torch.where(better, e, best_e)
                    # least squares of w = a q - b on these codes, b >= 0
                    qq, q1, o1 = _weighted(q, q, hb), _weighted(q, ones, hb), _weighted(ones, ones, hb)
                    qw, w1 = _weighted(q, wb, hb), _weighted(ones, wb, hb)
                    det = qq * o1 - q1 * q1
                    ok = det > 1e-12 * qq * o1
                    sd = torch.where(ok, det, torch.ones_like(det))
                    a2 = (qw * o1 - q1 * w1) / sd
                    b2 = (qw * q1 - qq * w1) / sd
                    neg = b2 < 0  # no positive minimum: refit the scale alone
                    a2 = torch.where(neg, qw / qq.clamp_min(1e-30), a2)
                    b2 = torch.where(neg, torch.zeros_like(b2), b2)
                    ok &= a2 >= 0
                    a, b = torch.where(ok, a2, a), torch.where(ok, b2, b)
        return best_a, best_b

    # -- steps 2 and 3 ------------------------------------------------------------------------

    def fit(self, w: torch.Tensor, h: torch.Tensor | None = None) -> KParts:
        """Factors and sub-block integers for w [N, K] (K whole super-blocks) with zero codes; h: H = X^T X
        of the inputs [K, K] (None: squared weight error). `quantize` adds the nearest codes."""
        n, k = w.shape
        sb = self.super_block
        if k % sb or sb % SUB:
            raise ValueError(f"a row of {k} is not whole super-blocks of {sb}")
        w = w.detach().float()
        g, nsb = k // SUB, k // sb
        wb = w.view(n, g, SUB)
        hb = _hblocks(h, k)
        per = sb // SUB
        zeros8 = torch.zeros(n, g, dtype=torch.uint8)
        if self.qtype == "Q3_K":
            sig = self._float_q3(wb, hb).view(n, nsb, per)
            idx = sig.abs().argmax(-1, keepdim=True)
            base = [sig.gather(-1, idx).squeeze(-1) / -32.0]  # that sub-block's scale is d (0 - 32)
            lo_i, hi_i = 0, 63
            targets = [sig.view(n, g)]
        else:
            a, b = self._float_q2(wb, hb)
            base = [a.view(n, nsb, per).amax(-1) / 15.0, b.view(n, nsb, per).amax(-1) / 15.0]
            lo_i, hi_i = 0, 15
            targets = [a, b]
        best = None  # (total error per super-block [N, nsb], fp16 factors, sub-block integers)
        radius = RADIUS[self.qtype] if self.radius is None else self.radius
        offsets = sorted(range(-radius, radius + 1), key=abs)  # on a tie the nearer integer stays
        for f in FACTORS[self.qtype]:
            facs = [(x * f).half() for x in base]
            dexp = [x.float().repeat_interleave(per, -1) for x in facs]  # [N, G]
            start = [torch.where(de != 0, t / torch.where(de != 0, de, torch.ones_like(de)), torch.zeros_like(t))
                     for t, de in zip(targets, dexp)]
            if self.qtype == "Q3_K":
                start = [start[0] + 32.0]  # the stored integer is s + 32
            start = [torch.round(s).clamp(lo_i, hi_i) for s in start]
            sub_best = torch.full((n, g), float("inf"))
            best_ints = [torch.zeros(n, g) for _ in start]
            grid_pts = [(o,) for o in offsets] if len(start) == 1 else [(o1, o2) for o1 in offsets for o2 in offsets]
            for offs in grid_pts:
                ints = [(s + o).clamp(lo_i, hi_i) for s, o in zip(start, offs)]
                if self.qtype == "Q3_K":
                    sc = ints[0]
                    sub_s = dexp[0] * (sc - 32.0)
                    sub_m = -4.0 * sub_s
                else:
                    sub_s = dexp[0] * ints[0]
                    sub_m = -(dexp[1] * ints[1])
                q = self.codes(wb, sub_s.unsqueeze(-1), sub_m.unsqueeze(-1))
                e = _err(wb - (q * sub_s.unsqueeze(-1) + sub_m.unsqueeze(-1)), hb)
                better = e < sub_best
                sub_best = torch.where(better, e, sub_best)
                best_ints = [torch.where(better, i, bi) for i, bi in zip(ints, best_ints)]
            total = sub_best.view(n, nsb, per).sum(-1)
            cand = (total, facs, best_ints)
            if best is None:
                best = cand
                continue
            better = total < best[0]
            wider = better.repeat_interleave(per, -1)
            best = (torch.where(better, total, best[0]), [torch.where(better, x, y) for x, y in zip(facs, best[1])],
                    [torch.where(wider, x, y) for x, y in zip(best_ints, best[2])])
        _, facs, ints = best
        if self.qtype == "Q3_K":
            return KParts("Q3_K", torch.zeros(n, k, dtype=torch.uint8), facs[0], ints[0].to(torch.uint8),
                          torch.zeros_like(facs[0]), zeros8)
        return KParts("Q2_K", torch.zeros(n, k, dtype=torch.uint8), facs[0], ints[0].to(torch.uint8), facs[1],
                      ints[1].to(torch.uint8))

    def quantize(self, w: torch.Tensor, h: torch.Tensor | None = None) -> KParts:
        """Round-to-nearest on the grid `fit` chooses (the weighted search with h)."""
        p = self.fit(w, h)
        n, k = w.shape
        s, m = p.scale_min()
        q = self.codes(w.detach().float().view(n, k // SUB, SUB), s.unsqueeze(2), m.unsqueeze(2))
        p.codes = q.to(torch.uint8).view(n, k)
        return p

    def rtn(self, w: torch.Tensor, h: torch.Tensor | None = None) -> KParts:
        return self.quantize(w, h)

    def assemble(self, codes: torch.Tensor, fits: list[KParts]) -> KParts:
        """A matrix's parts from its codes and the fits of its spans in order."""
        cat = [torch.cat([getattr(f, a) for f in fits], dim=1) for a in ("d", "sc", "dmin", "mn")]
        return KParts(self.qtype, codes, *cat)

    def dequantize(self, p: KParts) -> torch.Tensor:
        return p.dequantize()

    def pack(self, p: KParts) -> np.ndarray:
        return pack_k(p)


# -- bytes -------------------------------------------------------------------------------------------


def _low2_bits(c: torch.Tensor) -> torch.Tensor:
    """codes [B, 256] (values < 4 used) -> qs [B, 64]: element 128 h + 32 t + l at bits 2t of byte 32 h + l."""
    x = (c & 3).to(torch.int32).view(-1, 2, 4, 32)
    return (x[:, :, 0] | x[:, :, 1] << 2 | x[:, :, 2] << 4 | x[:, :, 3] << 6).to(torch.uint8).reshape(-1, 64)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1).contiguous().view(torch.uint8).reshape(-1, 2)


def pack_k(p: KParts) -> np.ndarray:
    """KParts -> the file's bytes, uint8 [N, K / 256 * block bytes] (the inverse of unpack_k)."""
    n, k = p.codes.shape
    if p.sc.shape[1] != 16 * p.d.shape[1]:
        raise ValueError("only super-blocks of 256 inputs have a GGUF layout")
    nb = n * k // QK_K
    c = p.codes.reshape(nb, QK_K)
    if int(c.max()) > (7 if p.qtype == "Q3_K" else 3):
        raise ValueError(f"{p.qtype} codes out of range")
    sc = p.sc.reshape(nb, 16).to(torch.int32)
    qs = _low2_bits(c)
    if p.qtype == "Q3_K":
        hi = (c >> 2).to(torch.int32).view(nb, 8, 32)  # bit b of byte l: element 32 b + l
        hmask = sum(hi[:, b] << b for b in range(8)).to(torch.uint8)
        low = sc & 0xF
        top = sc >> 4
        scales = torch.cat([(low[:, :8] | low[:, 8:] << 4),
                            (top[:, 0:4] | top[:, 4:8] << 2 | top[:, 8:12] << 4 | top[:, 12:16] << 6)], dim=1)
        out = torch.cat([hmask, qs, scales.to(torch.uint8), _f16_bytes(p.d)], dim=1)
    elif p.qtype == "Q2_K":
        scales = (sc | p.mn.reshape(nb, 16).to(torch.int32) << 4).to(torch.uint8)
        out = torch.cat([scales, qs, _f16_bytes(p.d), _f16_bytes(p.dmin)], dim=1)
    else:
        raise ValueError(f"cannot pack {p.qtype}")
    assert out.shape[1] == K_BYTES[p.qtype]
    return out.reshape(n, -1).numpy()


def unpack_k(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> KParts:
    """The file's Q3_K / Q2_K bytes of a weight [N, K] -> KParts (the inverse of pack_k)."""
    n, k = shape
    b = torch.from_numpy(np.array(np.asarray(raw).reshape(-1, K_BYTES[qtype]), copy=True))
    nb = b.shape[0]
    if qtype == "Q3_K":
        hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108].to(torch.int32), b[:, 108:110]
    else:
        scales, qs, d, dmin = b[:, :16].to(torch.int32), b[:, 16:80], b[:, 80:82], b[:, 82:84]
    q = qs.to(torch.int32).view(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    codes = (q & 3).reshape(nb, QK_K)
    d = d.contiguous().view(torch.float16).reshape(n, k // QK_K)
    if qtype == "Q3_K":
        hi = (hmask.to(torch.int32).view(nb, 1, 32) >> torch.arange(8, dtype=torch.int32).view(1, 8, 1)) & 1
        codes = codes | (hi.reshape(nb, QK_K) << 2)
        j = torch.arange(16)
        low = (scales[:, j % 8] >> (4 * (j // 8))) & 0xF
        top = (scales[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        sc = (low | top << 4).to(torch.uint8).reshape(n, k // SUB)
        return KParts(qtype, codes.to(torch.uint8).reshape(n, k), d, sc, torch.zeros_like(d),
                      torch.zeros_like(sc))
    dmin = dmin.contiguous().view(torch.float16).reshape(n, k // QK_K)
    return KParts(qtype, codes.to(torch.uint8).reshape(n, k), d, (scales & 0xF).to(torch.uint8).reshape(n, k // SUB),
                  dmin, (scales >> 4).to(torch.uint8).reshape(n, k // SUB))
