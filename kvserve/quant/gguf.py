"""GGUF block formats decoded with torch (vectorised over all blocks at once).

Q8_0, Q4_0 and Q4_1 are decoded to float here; every other type goes through `gguf.quants`, the
reference implementation these are tested against. The formats the native kernels run (Q4_0,
Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) are also read as codes, scales and minimums (`native_parts`), so a
layer runs on the file's own numbers with no float round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK = 32  # elements per block for the *_0 / *_1 formats
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}


CHUNK_BLOCKS = 1 << 16  # decoded at a time: keeps a load's transient memory at a few MB per tensor


def dequantize_torch(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Decode `raw` (uint8, rows of blocks) to float32 of `shape`; None if `qtype` is not handled here."""
    if qtype not in BLOCK_BYTES:
        return None
    flat = np.asarray(raw).reshape(-1, BLOCK_BYTES[qtype])
    out = torch.empty(flat.shape[0], QK, dtype=torch.float32)
    for start in range(0, flat.shape[0], CHUNK_BLOCKS):
        part = flat[start : start + CHUNK_BLOCKS]
        _decode_blocks(torch.from_numpy(np.array(part, copy=True)), qtype, out[start : start + len(part)])
    return out.reshape(shape)


def _decode_blocks(blocks: torch.Tensor, qtype: str, out: torch.Tensor) -> None:
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    if qtype == "Q8_0":
        torch.mul(blocks[:, 2:].contiguous().view(torch.int8).float(), d, out=out)
        return
    qs = blocks[:, 4:] if qtype == "Q4_1" else blocks[:, 2:]
    # element j < 16 is the low nibble of byte j, element 16 + j the high nibble
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).float()
    if qtype == "Q4_0":
        torch.mul(q - 8.0, d, out=out)
    else:
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        torch.add(q * d, m, out=out)


# -- 4-bit formats as the int4 kernel's codes, scales and minimums (no float round trip) --------------

Q4_NATIVE = ("Q4_0", "Q4_1", "Q4_K")
Q4_K_BLOCK = 256  # elements per Q4_K super-block: 8 sub-blocks of 32, each with a 6-bit scale and minimum
Q4_K_BYTES = 2 + 2 + 12 + Q4_K_BLOCK // 2


def _q4k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 12] packed bytes -> the 8 sub-block scales and 8 minimums (6 bits each) of each super-block.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 minimums 0-3; scales and minimums 4-7
    take their low 4 bits from bytes 8-11 (scale low nibble, minimum high nibble) and their top 2
    bits from the top 2 bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    p = packed.to(torch.int32)
    lo_sc, lo_mn, hi = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    sc = torch.cat([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)], dim=1)
    mn = torch.cat([lo_mn & 0x3F, (hi >> 4) | ((lo_mn >> 2) & 0x30)], dim=1)
    return sc, mn


def q4_parts(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit GGUF tensor [N, K] as (codes uint8 [N, K] in 0..15, d fp16 [N, K/32], m fp16 [N, K/32])
    with w = d * q + m per group of 32 (kvserve.quant.int4's layout). Q4_0 (w = d (q - 8)) and Q4_1
    map exactly; Q4_K's per-group d * scale and -dmin * minimum are rounded to fp16 (about 1e-3
    relative, far below the 4-bit step)."""
    n, k = shape
    if qtype in ("Q4_0", "Q4_1"):
        blocks = torch.from_numpy(np.array(np.asarray(raw).reshape(-1, BLOCK_BYTES[qtype]), copy=True))
        d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(n, k // QK)
        qs = blocks[:, 4:] if qtype == "Q4_1" else blocks[:, 2:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=1).reshape(n, k)  # element j < 16: low nibble of byte j
        m = blocks[:, 2:4].contiguous().view(torch.float16).reshape(n, k // QK) if qtype == "Q4_1" else -8 * d
        return q.contiguous(), d.contiguous(), m.contiguous()
    if qtype != "Q4_K":
        raise ValueError(f"{qtype} is not a 4-bit format the int4 kernel takes ({', '.join(Q4_NATIVE)})")
    blocks = torch.from_numpy(np.array(np.asarray(raw).reshape(-1, Q4_K_BYTES), copy=True))
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = _q4k_scales(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 elements: low nibbles first, then high
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, k)
    dg = (d * sc.float()).half().reshape(n, k // QK)
    mg = (-(dmin * mn.float())).half().reshape(n, k // QK)
    return q.contiguous(), dg.contiguous(), mg.contiguous()


# -- every format the native kernels run, as codes, scales and minimums ----------------------------------

# the kernel width each format runs at (Q3_K's and Q2_K's codes, a scale and minimum per 16, fit the 5-bit one)
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8,
               "Q3_K": 5, "Q2_K": 5}
Q5_BYTES = {"Q5_0": 2 + 4 + QK // 2, "Q5_1": 4 + 4 + QK // 2}  # d (and m), 32 high bits, 16 bytes of nibbles
K_BLOCK = 256  # elements per K-quant super-block
Q5_K_BYTES = 2 + 2 + 12 + K_BLOCK // 8 + K_BLOCK // 2
Q6_K_BYTES = K_BLOCK // 2 + K_BLOCK // 4 + K_BLOCK // 16 + 2


@dataclass
class BlockParts:
    """A weight [N, K] as a GGUF file stores it, in the native kernels' terms: unsigned codes of
    `bits` bits with an fp16 scale and minimum per group of inputs (32 or 16), w = scale * code + min.

    4-bit parts (group 32) feed the int4 kernel (quant/int4.py), wider ones the 5/6/8-bit kernel
    (quant/wide.py). Rows are independent, so row operations (a shard's slice, llama.cpp's q/k
    permutation) apply to every field alike."""

    bits: int
    codes: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # fp16 [N, K / group]
    minimum: torch.Tensor  # fp16 [N, K / group] (float32 on a GPTQ grid: -zero * scale, quant.grid.ZeroPointGrid)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, fn) -> "BlockParts":  # noqa: ANN001 - a function of a row-major tensor
        return BlockParts(self.bits, fn(self.codes), fn(self.scale), fn(self.minimum))

    def q4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """4-bit parts as the int4 kernel takes them: (codes, d, m), one scale and minimum per 32."""
        assert self.bits == 4 and self.scale.shape[1] * 32 >= self.codes.shape[1]
        return self.codes, self.scale, self.minimum

    def per16(self) -> "BlockParts":
        """The same weight with a scale and minimum per 16 inputs (the wide kernel's granularity)."""
        if self.scale.shape[1] * 16 >= self.codes.shape[1]:
            return self
        return BlockParts(self.bits, self.codes, self.scale.repeat_interleave(2, 1), self.minimum.repeat_interleave(2, 1))

    @staticmethod
    def cat(parts: list["BlockParts"]) -> "BlockParts":
        """Stack along rows (a fused projection's shards); parts of different formats take the widest."""
        if len({(p.bits, p.scale.shape[1]) for p in parts}) == 1:
            return BlockParts(parts[0].bits, *(torch.cat([getattr(p, f) for p in parts]) for f in
                                               ("codes", "scale", "minimum")))
        bits = max(5, *(p.bits for p in parts))  # the codes fit any wider format unchanged
        wide = [p.per16() for p in parts]
        return BlockParts(bits, *(torch.cat([getattr(p, f) for p in wide]) for f in ("codes", "scale", "minimum")))


def _blocks(raw: np.ndarray, nbytes: int) -> torch.Tensor:
    return torch.from_numpy(np.array(np.asarray(raw).reshape(-1, nbytes), copy=True))


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def native_parts(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> BlockParts | None:
    """A 2-D GGUF tensor of a format the native kernels run (NATIVE_BITS) as BlockParts, else None.

    Exact but for the K-quants' sub-block scales and minimums, d x 6- or 8-bit integer, rounded
    to fp16 (about 5e-4 relative, well below the quantization step)."""
    if qtype not in NATIVE_BITS or len(shape) != 2:
        return None
    n, k = shape
    if qtype in Q4_NATIVE:
        return BlockParts(4, *q4_parts(raw, qtype, shape))
    if qtype == "Q8_0":
        blocks = _blocks(raw, BLOCK_BYTES["Q8_0"])
        d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(n, k // QK)
        codes = (blocks[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8).reshape(n, k)
        return BlockParts(8, codes, d.contiguous(), (-128 * d).contiguous())
    if qtype in Q5_BYTES:  # llama.cpp's stand-in for K-quants where rows are not multiples of 256
        b = _blocks(raw, Q5_BYTES[qtype])
        at = 2 if qtype == "Q5_0" else 4
        d = b[:, 0:2].contiguous().view(torch.float16).reshape(n, k // QK)
        qh = b[:, at : at + 4].contiguous().view(torch.int32)  # bit j: element j's fifth bit
        qs = b[:, at + 4 :]
        high = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
        codes = (torch.cat((qs & 0x0F, qs >> 4), dim=1) | (high << 4)).reshape(n, k)
        m = -16 * d if qtype == "Q5_0" else b[:, 2:4].contiguous().view(torch.float16).reshape(n, k // QK)
        return BlockParts(5, codes, d.contiguous(), m.contiguous())
    if qtype == "Q6_K":
        b = _blocks(raw, Q6_K_BYTES)
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        sc = b[:, 192:208].contiguous().view(torch.int8).float()  # one per 16 elements, in order
        d = _f16(b[:, 208:210])
        # each half of 128: 32 elements at a time from (low nibbles of ql[0:32], bits 0-1 of qh),
        # (low of ql[32:64], bits 2-3), (high of ql[0:32], bits 4-5), (high of ql[32:64], bits 6-7)
        lo = torch.stack((ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4), 2)
        hi = torch.stack([(qh >> (2 * t)) & 3 for t in range(4)], 2)
        codes = (lo | (hi << 4)).reshape(n, k)
        s = (d * sc).half().reshape(n, k // 16)
        return BlockParts(6, codes, s, (-32 * s).contiguous())
    if qtype == "Q5_K":
        b = _blocks(raw, Q5_K_BYTES)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _q4k_scales(b[:, 4:16])
        qh, qs = b[:, 16:48], b[:, 48:].reshape(-1, 4, 32)
        # chunk c of 64: 32 low nibbles with bit 2c of qh, then 32 high nibbles with bit 2c + 1
        lo = torch.stack((qs & 0xF, qs >> 4), 2)  # [B, 4, 2, 32]
        hi = torch.stack([torch.stack(((qh >> (2 * c)) & 1, (qh >> (2 * c + 1)) & 1), 1) for c in range(4)], 1)
        codes = (lo | (hi << 4)).reshape(n, k)
        return BlockParts(5, codes, (d * sc.float()).half().reshape(n, k // QK),
                          (-(dmin * mn.float())).half().reshape(n, k // QK))
    if qtype in ("Q3_K", "Q2_K"):  # 3- or 2-bit codes per 16 inputs; no kernel of their own width yet
        from kvserve.quant.kquant import unpack_k

        p = unpack_k(raw, qtype, shape)
        s, m = p.scale_min()
        return BlockParts(5, p.codes, s.half(), m.half())
    return None
