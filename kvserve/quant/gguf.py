"""GGUF block formats decoded with torch (vectorised over all blocks at once).

Q8_0, Q4_0 and Q4_1 (the formats of the default model and the ones kvserve will run natively)
are decoded here; every other type goes through `gguf.quants`, the reference implementation
these are tested against.
"""

from __future__ import annotations

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
