"""The GPTQ checkpoint layout (AutoGPTQ's, read by GPTQModel, transformers and vLLM's gptq loader),
written and read from kvserve's codes and scales.

Per linear layer of K inputs and N outputs, in groups of G inputs, w[n, k] = scales[g, n] *
(code[k, n] - zero[g, n]) with g = g_idx[k]:

- qweight int32 [K * bits / 32, N]: each column's K codes as one little-endian bit stream along the
  input dim, code k at bits k * bits .. k * bits + bits - 1 (so at 3 bits a code may straddle two
  int32 words);
- qzeros int32 [K / G, N * bits / 32]: each group's N zero points packed the same way along the
  output dim, stored as zero - 1 (the classic checkpoint_format "gptq"; loaders add the 1 back
  after masking, so a zero of 0 cannot be stored);
- scales float16 [K / G, N];
- g_idx int32 [K]: input k's group, k // G when the columns were not reordered (desc_act false).

kvserve's parts are w = scale * code + minimum (quant.gguf.BlockParts): the zero is -minimum /
scale, and a grid whose minimum is not an integer multiple of its scale (GGUF Q4_1's) is refused
rather than rounded.
"""

from __future__ import annotations

import numpy as np
import torch

from kvserve.quant.gguf import BlockParts

BITS = (2, 3, 4, 8)


def quantization_config(bits: int, group: int, symmetric: bool) -> dict[str, object]:
    """config.json's quantization_config for a checkpoint this module writes."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": symmetric,
            "checkpoint_format": "gptq", "lm_head": False}


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [R, C] (each < 2^bits) -> int32 [R * bits / 32, C]: each column's R values as
    one bit stream, value r at bits r * bits .. (r + 1) * bits - 1, lowest bits first.

    At 2, 4 and 8 bits whole values fill a word; at 3 bits every 32 values fill 3 words, so the stream
    is built 32 values at a time: value i of a chunk lands at bit 3 i, its top bits spilling into the
    next word where it straddles one."""
    values = np.ascontiguousarray(values)  # (the results keep its memory order)
    r, c = values.shape
    if r * bits % 32:
        raise ValueError(f"{r} values of {bits} bits are not whole int32 words")
    if 32 % bits == 0:
        per = 32 // bits
        v = values.astype(np.uint32).reshape(r // per, per, c)
        shifts = (np.arange(per, dtype=np.uint32) * bits)[None, :, None]
        return np.bitwise_or.reduce(v << shifts, axis=1).view(np.int32)
    v = values.astype(np.uint64).reshape(r // 32, 32, c)
    words = np.zeros((r // 32, bits + 1, c), dtype=np.uint64)  # one spare word for the last value's spill
    for i in range(32):
        w, shift = divmod(i * bits, 32)
        x = v[:, i] << np.uint64(shift)
        words[:, w] |= x & np.uint64(0xFFFFFFFF)
        words[:, w + 1] |= x >> np.uint64(32)
    return words[:, :bits].astype(np.uint32).reshape(r * bits // 32, c).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_bits: int32 [W, C] -> int64 [W * 32 / bits, C]."""
    words = np.ascontiguousarray(words)
    w, c = words.shape
    mask = np.uint64(2**bits - 1)
    if 32 % bits == 0:
        per = 32 // bits
        u = words.view(np.uint32).astype(np.uint64)[:, None, :]
        shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, :, None]
        return ((u >> shifts) & mask).reshape(w * per, c).astype(np.int64)
    u = words.view(np.uint32).astype(np.uint64).reshape(w // bits, bits, c)
    u = np.concatenate([u, np.zeros_like(u[:, :1])], axis=1)
    out = np.empty((w // bits, 32, c), dtype=np.int64)
    for i in range(32):
        k, shift = divmod(i * bits, 32)
        pair = u[:, k] | (u[:, k + 1] << np.uint64(32))
        out[:, i] = ((pair >> np.uint64(shift)) & mask).astype(np.int64)
    return out.reshape(w * 32 // bits, c)


def zero_points(parts: BlockParts, bits: int, name: str) -> torch.Tensor:
    """The integer zero point of each group, int64 [N, groups], or ValueError where the grid has none
    the layout can store exactly."""
    s, m = parts.scale.float(), parts.minimum.float()
    mid = float(2 ** (bits - 1))
    z = torch.where(s != 0, torch.round(-m / torch.where(s != 0, s, torch.ones_like(s))), torch.full_like(s, mid))
    if not torch.equal(-z * s, m) or not torch.isfinite(s).all():
        raise ValueError(f"{name}: the grid's minimum per group is not an integer zero point times its scale "
                         "(GGUF q4_1's float minimum): the GPTQ layout cannot hold it exactly; write a .gguf")
    if int(z.min()) < 1 or int(z.max()) > 2**bits - 1:
        raise ValueError(f"{name}: zero points must be 1..{2**bits - 1} (the classic GPTQ checkpoint stores zero - 1)")
    if int(parts.codes.max()) > 2**bits - 1:
        raise ValueError(f"{name}: codes wider than {bits} bits")
    return z.long()


def to_gptq(parts: BlockParts, bits: int, name: str) -> dict[str, torch.Tensor]:
    """A linear's parts [N, K] -> its GPTQ tensors (qweight, qzeros, scales, g_idx)."""
    n, k = parts.codes.shape
    groups = parts.scale.shape[1]
    if k % groups or n * bits % 32 or k * bits % 32:
        raise ValueError(f"{name}: [{n}, {k}] in groups of {k // groups} does not pack in {bits}-bit GPTQ words")
    z = zero_points(parts, bits, name)
    return {
        "qweight": torch.from_numpy(pack_bits(parts.codes.t().numpy(), bits)),
        "qzeros": torch.from_numpy(pack_bits((z - 1).numpy(), bits).T.copy()),
        "scales": parts.scale.half().t().contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32) // (k // groups),
    }


def kernel_step(bits: int, group: int) -> int | None:
    """Inputs per scale of the native kernel that runs these codes with the group's scale repeated:
    the int4 kernel's 32 (4 bits), the wide kernel's 32 or 16 (2, 3 bits as its 5-bit codes; 8 bits);
    None where the groups are not whole steps."""
    step = 32 if bits == 4 or group % 32 == 0 else 16
    return None if group % step else step


def minimum_is_fp16(minimum: torch.Tensor) -> bool:
    """Whether every -zero * scale is an fp16 value: the kernels keep the minimum in fp16."""
    return bool(torch.equal(minimum.half().float(), minimum))


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros int32 [groups, N * bits / 32] -> the zero points int64 [N, groups] (stored + 1)."""
    return torch.from_numpy(unpack_bits(qzeros.t().contiguous().numpy(), bits) + 1)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              bits: int, group_size: int, name: str, native: bool = False) -> tuple[torch.Tensor, BlockParts | None]:
    """A linear's GPTQ tensors -> (float32 weight [N, K] = scales * (code - zero), the kernels' parts
    or None). ValueError for shapes that do not fit or a g_idx that reorders the inputs."""
    kw, n = qweight.shape
    k = kw * 32 // bits
    group = k if group_size == -1 else group_size
    if k % group or tuple(scales.shape) != (k // group, n) or tuple(qzeros.shape) != (k // group, n * bits // 32):
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} are not a {bits}-bit GPTQ layer in groups of {group}")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
        raise ValueError(f"{name}: g_idx reorders the inputs (desc_act / act-order checkpoint); kvserve reads "
                         "only checkpoints in input order")
    codes = torch.from_numpy(unpack_bits(qweight.numpy(), bits)).t().to(torch.uint8).contiguous()  # [N, K]
    s = scales.float().t()
    minimum = -unpack_zeros(qzeros, bits).float() * s  # exact in float32: an fp16 times an integer of <= 9 bits
    w = (codes.float().view(n, k // group, group) * s.unsqueeze(2) + minimum.unsqueeze(2)).view(n, k)
    step = kernel_step(bits, group)
    if not native or step is None or scales.dtype != torch.float16 or not minimum_is_fp16(minimum):
        return w, None
    rep = group // step  # the kernels' parts: each group's scale and minimum over its 32s (16s)
    return w, BlockParts(bits if bits in (4, 8) else 5, codes, scales.t().repeat_interleave(rep, 1).contiguous(),
                         minimum.half().repeat_interleave(rep, 1).contiguous())
