"""Paged extend attention: prefill and chunked prefill over a cached prefix, causal, variable lengths.

Sequence s has `query_len` new tokens, the last ones of its `seq_len`-token context; all of
its K/V, the new rows included, are already in the paged cache. Grid: (sequence, query head,
query tile of BLOCK_M rows). Each program streams the keys from position 0 up to its tile's
last query position in BLOCK_N tiles (FlashAttention: scores of a tile by tl.dot, online
softmax in base 2, the output rescaled as the running max grows). Tiles past a sequence's
query_len exit at once, so the grid is sized by the longest query of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.triton.decode_attention import LOG2E, dot_options


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, seq_ids_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch,  # K and V caches share strides; head_dim stride 1
    stride_sb, stride_st,  # int8 scales [num_blocks, block_size, Hkv]; head stride 1
    stride_bt,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 (see dot_options)
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + i)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        kv_head = head // GROUP
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        m_mask = m < q_len
        d_mask = d < HEAD_DIM
        q_pos = seq_len - q_len + m  # absolute position of each query row
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = block_tables_ptr + seq * stride_bt
        # keys after the tile's last query position are masked for every row: stop before them
        end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
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
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            causal = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            s = tl.where(causal, s, float("-inf"))
            # key 0 is visible to every row (padding rows included), and the first tile holds it,
            # so m_i is finite from the first iteration on and no row ever computes inf - inf
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        o = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_tiles(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for q of `dtype`: large tiles that spill no register
    on sm_80 or sm_90, at BLOCK_M and at the smaller BLOCK_M short queries take.

    Checked by tests/kernels/test_triton_compile.py (ptxas -v on every launch the engine can make).
    16-bit, head_dim <= 64: 64x64, 4 warps. 16-bit, head_dim 128: 64x64 spills on sm_80 (no wgmma:
    the accumulator lives in registers; 255 registers and 28-40 bytes of spills, int8 already at
    BLOCK_M=32), so 64x32 with two pipeline stages (at most 248 registers, int8 on sm_80).
    float32 multiplies on the FMA units (ieee precision, no tensor cores) with tiles twice the size
    of bf16 ones: 64x64 spilled kilobytes per thread, so small tiles over 8 warps (32x32 for
    head_dim <= 64, 16x16 above). float32 keeps the Triton path on a GPU (one code path, decode
    CUDA graphs), but it is not a performance target: serve bf16.
    """
    if dtype == torch.float32:
        return (32, 32, 8, 3) if head_dim <= 64 else (16, 16, 8, 3)
    return (64, 64, 4, 3) if head_dim <= 64 else (64, 32, 4, 2)


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_ids: torch.Tensor,
    max_query_len: int,
    out: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Causal attention of the new tokens of each sequence in `seq_ids` over its paged context.

    q, out: [T, H, D] flat batch; sequence s owns rows query_start_loc[s]:query_start_loc[s+1],
    the last of its seq_lens[s] positions. `max_query_len` bounds those row counts (host value,
    it sizes the grid). Writes out's rows of those sequences in place. block_m/block_n default to
    `extend_tiles` for q's dtype.
    """
    num_seqs = seq_ids.numel()
    if num_seqs == 0 or max_query_len == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    quant = k_scale is not None
    scale_strides = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    if not quant:
        k_scale = v_scale = k_cache  # placeholders, never read
    tile_m, tile_n, num_warps, num_stages = extend_tiles(q.dtype, head_dim)
    block_m, block_n = block_m or tile_m, block_n or tile_n
    # small queries (chunk tails, short prompts) waste less of a smaller tile
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale,
        block_tables, seq_lens, query_start_loc, seq_ids, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides,
        block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1], GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        QUANT=quant, **dot_options(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
