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
