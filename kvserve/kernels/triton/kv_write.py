"""Store the new tokens' K/V rows into the paged cache at their slots (optionally as int8)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_half_even(y):
    """torch.round semantics (ties to even), so int8 codes match the torch quantizer bit for bit."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _store_row(src_ptr, dst_ptr, scale_ptr, tok, head, dst_off, scale_off, stride_st, stride_sh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    x = tl.load(src_ptr + tok * stride_st + head * stride_sh + d, mask=d_mask, other=0.0)
    dst = dst_ptr + dst_off + d
    if QUANT:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        code = round_half_even(tl.math.div_rn(xf, scale))
        code = tl.minimum(tl.maximum(code, -127.0), 127.0)
        tl.store(dst, code.to(tl.int8), mask=d_mask)
        tl.store(scale_ptr + scale_off, scale)
    else:
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,  # cache strides, identical for K and V; head_dim stride is 1
    stride_sb, stride_st,  # scale strides [num_blocks, block_size, Hkv]; head stride is 1
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)  # int64: big caches overflow int32 offsets
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst_off = block * stride_cb + offset * stride_ct + head * stride_ch
    scale_off = block * stride_sb + offset * stride_st + head
    _store_row(k_ptr, k_cache_ptr, k_scale_ptr, tok, head, dst_off, scale_off, stride_kt, stride_kh,
               HEAD_DIM, BLOCK_D, QUANT)
    _store_row(v_ptr, v_cache_ptr, v_scale_ptr, tok, head, dst_off, scale_off, stride_vt, stride_vh,
               HEAD_DIM, BLOCK_D, QUANT)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at `slot_mapping` [T].

    With `k_scale`/`v_scale` ([num_blocks, block_size, Hkv] float32) the caches are int8 and each
    row is quantized symmetrically with its own scale (amax / 127).
    """
    T, num_kv_heads, head_dim = k.shape
    if T == 0:
        return
    quant = k_scale is not None
    assert (v_scale is not None) == quant, "K and V are quantized together"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if quant:
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(-1) == 1 and k_scale.dtype == torch.float32
        scale_strides = (k_scale.stride(0), k_scale.stride(1))
    else:
        k_scale = v_scale = k_cache  # unused placeholders (QUANT is a constexpr, the branch is compiled out)
        scale_strides = (0, 0)
    _write_kv_kernel[(T, num_kv_heads)](
        k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), QUANT=quant,
    )
