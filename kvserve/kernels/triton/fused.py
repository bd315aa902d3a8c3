"""Fused elementwise kernels: each replaces several torch ops and their round trips through memory.

Every kernel reproduces the rounding steps of its torch layer (kvserve/layers/): values are
rounded to the activation dtype exactly where the torch code rounds them, so a bf16 model
gives the same numbers up to the last bit of exp/rsqrt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    dim, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    mask = c < dim
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the torch layer adds in the activation dtype, then normalises that rounded sum
        r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + c, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)  # RMSNorm casts back to the input dtype before the weight
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, also returns the sum x + residual it normalised."""
    shape, dim = x.shape, x.shape[-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    rows = x2.shape[0]
    if residual is not None:
        r2 = residual.reshape(-1, dim)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2  # placeholders, never read or written
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            dim, eps,
            BLOCK=triton.next_power_of_2(dim), HAS_RESIDUAL=residual is not None,
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n
    gate = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + c, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds to the activation dtype
    tl.store(out_ptr + row * stride_o + c, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2n] = [gate | up] -> silu(gate) * up, [..., n]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n,
                                                                  BLOCK=block)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rotary_kernel(
    pos_ptr, cos_ptr, sin_ptr, x_ptr, out_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cache,
    num_heads, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    h_mask = h < num_heads
    j_mask = j < HALF
    # cos/sin rows are [f_0..f_{half-1}, f_0..f_{half-1}] (the layer's table): the first half suffices
    cos = tl.load(cos_ptr + pos * stride_cache + j, mask=j_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cache + j, mask=j_mask, other=0.0)[None, :]
    mask = h_mask[:, None] & j_mask[None, :]
    src = x_ptr + tok * stride_xt + h[:, None] * stride_xh + j[None, :]
    dst = out_ptr + tok * stride_ot + h[:, None] * stride_oh + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(dst, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)
    if BLOCK_REST > 0:  # partial rotary: the dims past the rotary ones are copied through
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        r_mask = h_mask[:, None] & (r < HEAD_DIM)[None, :]
        rest = tl.load(x_ptr + tok * stride_xt + h[:, None] * stride_xh + r[None, :], mask=r_mask, other=0.0)
        tl.store(out_ptr + tok * stride_ot + h[:, None] * stride_oh + r[None, :], rest, mask=r_mask)


def _rotate_one(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rotary_dim: int) -> torch.Tensor:
    T, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(T, num_heads, head_dim, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    half = rotary_dim // 2
    rest = head_dim - rotary_dim
    _rotary_kernel[(T,)](
        positions, cos, sin, x, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        num_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
    )
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style ("rotate half") RoPE of q [T, H, D] and k [T, Hkv, D] at `positions`, out of place.

    cos_cache/sin_cache: [max_position, rotary_dim] float32 tables as RotaryEmbedding builds them.
    """
    assert cos_cache.stride(-1) == 1 and cos_cache.stride() == sin_cache.stride()
    return (_rotate_one(positions, q, cos_cache, sin_cache, rotary_dim),
            _rotate_one(positions, k, cos_cache, sin_cache, rotary_dim))
