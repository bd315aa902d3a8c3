"""Paged decode attention: one query token per sequence, Flash-Decoding over the paged K/V.

Grid: (sequence, KV head, split). One program owns every query head of one KV group
(GQA), so each K/V tile is loaded once for the whole group and the group's heads form the M
side of a tl.dot (padded to 16 rows, the smallest tile tl.dot takes). A long context is cut
into `num_splits` contiguous chunks handled by separate programs; each writes its partial
output (already normalised) and its log-sum-exp, and a second kernel merges the chunks.
With one split the first kernel writes the output directly.

Softmax runs in the base-2 domain (scores pre-multiplied by log2(e)) because exp2 is the
native instruction; the merge uses the same base, so the result is the ordinary softmax.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, seq_ids_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # a runtime value: one compiled kernel serves every split count > 1
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch,  # K and V caches share strides; head_dim stride 1
    stride_sb, stride_st,  # int8 scales [num_blocks, block_size, Hkv]; head stride 1
    stride_bt,
    stride_pi, stride_ph, stride_ps,  # partials [Bd, H, splits, D]; lse [Bd, H, splits] is contiguous
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,  # SPLIT: num_splits > 1
    DOT_F32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 (see dot_options)
):
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + i)
    row = tl.load(query_start_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    # each split takes a whole number of BLOCK_N tiles; trailing splits of a short sequence are empty
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + h
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offset = n % BLOCK_SIZE
        kv_off = block * stride_cb + offset * stride_ct + kv_head * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if QUANT:
            s_off = block * stride_sb + offset * stride_st + kv_head
            k_s = tl.load(k_scale_ptr + s_off, mask=n_mask, other=0.0)
            v_s = tl.load(v_scale_ptr + s_off, mask=n_mask, other=0.0)
            k = (k.to(tl.float32) * k_s[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_s[:, None]).to(q.dtype)
        else:  # a cache dtype other than the model's (fp32 model, bf16 cache): tl.dot needs one dtype
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # every tile in the loop has at least one valid key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out_mask = h_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        empty = l_i == 0.0  # a split past the end of a short sequence
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        part = i * stride_pi + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part[:, None] + d[None, :], o, mask=out_mask)
        tl.store(part_lse_ptr + (i * GROUP * tl.num_programs(1) + heads) * num_splits + split, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, seq_ids_ptr,
    stride_pi, stride_ph, stride_ps, stride_ot, stride_oh, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_ptr + tl.load(seq_ids_ptr + i))
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + (i * tl.num_programs(1) + head) * num_splits + s, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)  # finite: the first split always holds a token
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + i * stride_pi + head * stride_ph + s[:, None] * stride_ps + d[None, :],
                    mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot settings for inputs of `dtype`.

    fp32 models get full fp32 products (tl.dot would otherwise use tf32 on the GPU). Triton's
    CPU interpreter multiplies bf16 operands as their raw uint16 bit patterns, so under
    TRITON_INTERPRET the kernels upcast bf16 tiles to fp32 before tl.dot; compiled kernels
    keep the native bf16 MMA.
    """
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    dot_f32 = interpret and dtype == torch.bfloat16
    # None keeps tl.dot's default for 16-bit operands (precision only matters for fp32 inputs)
    return {"PRECISION": "ieee" if dtype == torch.float32 or dot_f32 else None, "DOT_F32": dot_f32}


def decode_tiles(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the decode kernel: no register spills on sm_80/sm_90 (see extend_tiles).

    16-bit: 32 keys a tile, 4 warps. float32 with head_dim 128 spilled 300-500 bytes a thread at
    that size (fp32 K/V tiles, no tensor cores): 16 keys over 8 warps.
    """
    return (16, 8) if dtype == torch.float32 else (32, 4)


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      min_tokens_per_split: int = 256, max_splits: int = 16) -> int:
    """Enough splits to give the GPU ~2 programs per SM, each with at least a few hundred tokens."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = math.ceil(2 * sms / max(1, num_seqs * num_kv_heads))
    by_length = math.ceil(max_seq_len / min_tokens_per_split)
    return max(1, min(want, by_length, max_splits))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_ids: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_n: int | None = None,
) -> None:
    """Attend the single query token of each sequence in `seq_ids` over its paged context.

    q, out: [T, H, D] (flat batch; sequence s's token is row query_start_loc[s]);
    caches: [num_blocks, block_size, Hkv, D]; seq_lens include the new token (already written).
    Writes out's rows in place; other rows are untouched. block_n defaults to `decode_tiles`.
    """
    num_decodes = seq_ids.numel()
    if num_decodes == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    quant = k_scale is not None
    scale_strides = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    if not quant:
        k_scale = v_scale = k_cache  # placeholders, never read
    tile_n, num_warps = decode_tiles(q.dtype)
    block_n = block_n or tile_n
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(num_decodes, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_strides = part_out.stride()[:3]
    else:
        part_out = part_lse = out  # placeholders, never written
        part_strides = (0, 0, 0)
    _decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale,
        block_tables, seq_lens, query_start_loc, seq_ids,
        out, part_out, part_lse,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides,
        block_tables.stride(0),
        *part_strides,
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        SPLIT=num_splits > 1, QUANT=quant, **dot_options(q.dtype), num_warps=num_warps,
    )
    if num_splits > 1:
        _merge_kernel[(num_decodes, num_heads)](
            part_out, part_lse, out, query_start_loc, seq_ids,
            *part_strides, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d,
        )
