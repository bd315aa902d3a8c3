"""The kernels on torch tensors: quantizers, packers, GEMMs, paged attention, the fused decode step."""

from __future__ import annotations

import ctypes
import functools

import torch

from kvserve.kernels.cpu.library import ModelArgs, _check, _lib, _ptr, _ready_lib, available

GROUP = 32  # activation values per scale


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (round(x / scale) + 128 as uint8 [M, K padded to 32], scales [M, K/32])."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    m, k = x.shape
    g = -(-k // GROUP)
    xq = torch.empty((m, g * GROUP), dtype=torch.uint8)
    dx = torch.empty((m, g), dtype=torch.float32)
    lib.kv_quantize_act(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr())
    return xq, dx


def pack_weight(wq: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> the kernel's layout (blocks of 16 channels x groups of 4 k's, zero padded)
    and the offset correction -128 x each 32-group's sum, [N/16, K/32, 16] int32. With `inplace`
    (N a multiple of 16, K of 32, wq contiguous and the caller's to give) the layout is written
    over wq's own bytes, which are returned: a big table is never held twice."""
    lib = _lib()
    assert lib is not None and wq.dtype == torch.int8
    n, k = wq.shape
    n16, g = -(-n // 16), -(-k // GROUP)
    inplace = inplace and wq.is_contiguous() and n % 16 == 0 and k % GROUP == 0
    wq = wq.contiguous()
    wp = wq.view(-1) if inplace else torch.empty(n16 * g * GROUP * 16, dtype=torch.int8)
    corr = _group_correction(wq, n16, g)  # from the rows, before an in-place pack overwrites them
    if inplace:
        _check(lib.kv_pack_weight_inplace(wp.data_ptr(), n, k), "int8 pack")
    else:
        lib.kv_pack_weight(wq.data_ptr(), n, k, wp.data_ptr())
    return wp, corr


def _group_correction(wq: torch.Tensor, n16: int, g: int) -> torch.Tensor:
    n, k = wq.shape
    # -128 x each group's sum, computed a chunk of rows at a time (no int32 copy of a big weight)
    sums = torch.zeros(n16 * 16, g, dtype=torch.int32)
    for r in range(0, n, 1024):
        part = torch.nn.functional.pad(wq[r : r + 1024].to(torch.int32), (0, g * GROUP - k))
        sums[r : r + len(part)] = part.view(len(part), g, GROUP).sum(-1, dtype=torch.int32)
    return (-128 * sums.view(n16, 16, g)).transpose(1, 2).contiguous()


def embed_rows(wp: torch.Tensor, dw: torch.Tensor, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [...] of the int8 weight packed by `pack_weight` (scales dw [N]) as float32 [..., k]."""
    lib = _ready_lib()
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(*ids.shape, k, dtype=torch.float32)
    lib.kv_embed_rows(wp.data_ptr(), dw.data_ptr(), k, flat.data_ptr(), flat.numel(), out.data_ptr())
    return out


def qgemm(x: torch.Tensor, wp: torch.Tensor, dw: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] @ (int8 W [N, K] * dw [N])^T -> float32 [M, N], activations quantized per
    token in groups of 32. `wp`, `corr` come from `pack_weight`."""
    lib = _ready_lib()
    m, k = x.shape
    n = dw.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.kv_linear(x.data_ptr(), m, k, wp.data_ptr(), dw.data_ptr(), corr.data_ptr(), n, y.data_ptr()),
           "int8 GEMM")
    return y


Q4_GROUP_BYTES = 320  # per 16 channels x 32 inputs: 256 bytes of nibbles, 16 fp16 scales, 16 fp16 minimums


def quantize_act_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (round(x / scale) int8 [M, K padded to 32], scales [M, G], scale x group sums [M, G])."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    m, k = x.shape
    g = -(-k // GROUP)
    xq = torch.empty((m, g * GROUP), dtype=torch.int8)
    dx = torch.empty((m, g), dtype=torch.float32)
    xs = torch.empty((m, g), dtype=torch.float32)
    lib.kv_quantize_act_s8(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr(), xs.data_ptr())
    return xq, dx, xs


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """4-bit codes q [N, K] (uint8, 0..15) with fp16 scales d and minimums m [N, K/32] -> the
    int4 kernel's interleaved layout (uint8)."""
    lib = _lib()
    assert lib is not None and q.dtype == torch.uint8 and d.dtype == m.dtype == torch.float16
    q, d, m = q.contiguous(), d.contiguous(), m.contiguous()
    n, k = q.shape
    out = torch.empty(-(-n // 16) * -(-k // GROUP) * Q4_GROUP_BYTES, dtype=torch.uint8)
    lib.kv_pack_q4(q.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, out.data_ptr())
    return out


def q4gemm(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [M, K] @ (int4 W [N, K], packed by `pack_q4`)^T -> float32 [M, N]."""
    lib = _ready_lib()
    m, k = x.shape
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.kv_linear_q4(x.data_ptr(), m, k, wp.data_ptr(), n, y.data_ptr()), "int4 GEMM")
    return y


# rows up to which the few-row float32 kernel beats torch's GEMM, per variant (measured on 2 threads of a
# Sapphire Rapids against torch's AVX-512 GEMM, the default model's 121 linears, weights streamed from
# memory: AVX-512 1.09-1.89x from 1 to 32 rows, 0.95x at 64; AVX2 1.0-1.45x to 12 rows, 0.94x at 16,
# 1.05x at 16 against torch held to AVX2 by MKL_ENABLE_INSTRUCTIONS)
F32_FEW_ROWS = {"avx512": 32, "avxvnni": 16, "avx2": 16, "neon": 8}


@functools.cache
def _few_rows(lib: ctypes.CDLL) -> int:
    return F32_FEW_ROWS.get(lib.kv_isa().decode(), 0)


def f32_few_rows() -> int:
    """How many rows the float32 kernel takes over from torch (0: none, no native kernels)."""
    lib = _lib()
    return 0 if lib is None else _few_rows(lib)


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x [..., K] @ w [N, K]^T (+ bias) by the few-row kernel (gemm_f32.c): the weight read
    once whatever the rows, and each output's bits independent of the rows beside it."""
    lib = _ready_lib()
    n, k = w.shape
    assert x.dtype == w.dtype == torch.float32 and w.is_contiguous() and x.shape[-1] == k
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    lib.kv_linear_f32(x2.data_ptr(), x2.shape[0], k, w.data_ptr(), _ptr(bias), n, y.data_ptr())
    return y.view(*x.shape[:-1], n)


WIDE_HIGH_BITS = {5: 1, 6: 2, 8: 4}  # code bits -> bits above the low nibble


def wide_group_bytes(bits: int) -> int:
    """Packed bytes per 16 channels x 32 inputs: nibbles, high-bit planes, fp16 scales and minimums per half."""
    return 256 + 64 * WIDE_HIGH_BITS[bits] + 128


def quantize_act_s8h(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """As quantize_act_s8, with the sums per half group: (xq, dx [M, G], dx x sums [M, G, 2], int sums [M, G, 2])."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    m, k = x.shape
    g = -(-k // GROUP)
    xq = torch.empty((m, g * GROUP), dtype=torch.int8)
    dx = torch.empty((m, g), dtype=torch.float32)
    xs = torch.empty((m, g, 2), dtype=torch.float32)
    hs = torch.empty((m, g, 2), dtype=torch.int32)
    lib.kv_quantize_act_s8h(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr(), xs.data_ptr(), hs.data_ptr())
    return xq, dx, xs, hs


def pack_wide(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q [N, K] (uint8, below 2^bits) with fp16 scales s and minimums m [N, K/16] -> the
    5/6/8-bit kernel's layout (gemm_wide.c). 8-bit codes are multiplied as (q - 128), so their
    minimums are packed as m + 128 s."""
    lib = _lib()
    assert lib is not None and q.dtype == torch.uint8 and s.dtype == m.dtype == torch.float16
    n, k = q.shape
    assert s.shape == m.shape == (n, 2 * -(-k // GROUP))
    if bits == 8:
        m = (m.float() + 128 * s.float()).half()
    q, s, m = q.contiguous(), s.contiguous(), m.contiguous()
    out = torch.empty(-(-n // 16) * -(-k // GROUP) * wide_group_bytes(bits), dtype=torch.uint8)
    lib.kv_pack_wide(q.data_ptr(), s.data_ptr(), m.data_ptr(), n, k, WIDE_HIGH_BITS[bits], out.data_ptr())
    return out


def wide_gemm(x: torch.Tensor, wp: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """float32 [M, K] @ (W [N, K] of `bits`-bit codes, packed by `pack_wide`)^T -> float32 [M, N]."""
    lib = _ready_lib()
    m, k = x.shape
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.kv_linear_wide(x.data_ptr(), m, k, wp.data_ptr(), n, WIDE_HIGH_BITS[bits], y.data_ptr()),
           f"{bits}-bit GEMM")
    return y


_CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.float16: 3}


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (available() and q.device.type == "cpu" and k_cache.dtype in _CACHE_DTYPES and q.shape[-1] % 16 == 0
            and q.shape[1] % k_cache.shape[2] == 0)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, q [B, H, D] -> [B, H, D] (float32), reading the paged cache
    [num_blocks, block_size, Hkv, D] in place through block_tables [B, W] int32 and seq_lens [B] int32."""
    lib = _ready_lib()
    qf = q.to(torch.float32).contiguous()  # both return their input unchanged when it already fits
    b, h, d = qf.shape
    out = torch.empty_like(qf)
    bt = block_tables.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    _check(lib.kv_paged_decode_attention(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale),
                                         _ptr(v_scale), _CACHE_DTYPES[k_cache.dtype], bt.data_ptr(), bt.shape[1],
                                         sl.data_ptr(), b, h, k_cache.shape[2], d, k_cache.shape[1], float(scale),
                                         out.data_ptr()), "decode attention")
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_tables: torch.Tensor,
                            q_start: list[int], q_len: list[int], seq_lens: list[int], scale: float,
                            out: torch.Tensor) -> None:
    """Causal attention of several new tokens per sequence over their paged context, into `out`.

    q, out: [T, H, D] float32 (contiguous). Sequence b's new tokens are rows q_start[b] ..
    q_start[b] + q_len[b] - 1, the last q_len[b] of its seq_lens[b] positions, their K/V already
    in the cache; q_len[b] == 0 skips it (its rows of `out` are left as they are)."""
    lib = _ready_lib()
    assert q.dtype == out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
    t, h, d = q.shape
    bt = block_tables.to(torch.int32).contiguous()
    qs, ql, sl = (torch.tensor(v, dtype=torch.int32) for v in (q_start, q_len, seq_lens))
    _check(lib.kv_paged_prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale),
                                          _ptr(v_scale), _CACHE_DTYPES[k_cache.dtype], bt.data_ptr(), bt.shape[1],
                                          qs.data_ptr(), ql.data_ptr(), sl.data_ptr(), len(q_len), h,
                                          k_cache.shape[2], d, k_cache.shape[1], float(scale), out.data_ptr()),
           "prefill attention")


def cache_dtype_code(dtype: torch.dtype) -> int | None:
    return _CACHE_DTYPES.get(dtype)


def llama_decode(model: ModelArgs, layers: ctypes.Array, x: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Run every layer of a batch of single-token sequences in place on the residual stream
    x [M, hidden] float32 (see kv_llama_decode in llama_decode.c). positions/slots int64 [M],
    block_tables int32 [M, W], seq_lens int32 [M]; all contiguous."""
    lib = _ready_lib()
    _check(lib.kv_llama_decode(ctypes.byref(model), layers, len(layers), x.data_ptr(), x.shape[0], positions.data_ptr(),
                               slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr()),
           "fused decode step")


def llama_extend(model: ModelArgs, layers: ctypes.Array, x: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                 seq_lens: torch.Tensor) -> None:
    """Every layer of B sequences' prompt chunks in place on x [M, hidden] float32 (kv_llama_extend):
    rows q_start[b] .. + q_len[b] are sequence b's new tokens, attending over its paged cache as an extend.
    positions/slots int64 [M], block_tables int32 [B, W], q_start/q_len/seq_lens int32 [B]; contiguous."""
    lib = _ready_lib()
    _check(lib.kv_llama_extend(ctypes.byref(model), layers, len(layers), x.data_ptr(), x.shape[0], positions.data_ptr(),
                               slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], q_start.data_ptr(),
                               q_len.data_ptr(), seq_lens.data_ptr(), q_start.numel()),
           "fused prompt step")


def argmax_rows(logits: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """torch.argmax(logits[:, :width], dim=-1) (int64 [B]) by one native pass over each row: the first
    index of the largest value, a NaN counting as largest. logits float32 [B, V] on the CPU, rows
    contiguous (a view of the first `width` columns is fine)."""
    lib = _ready_lib()
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 and logits.device.type == "cpu"
    width = logits.shape[1] if width is None else width
    assert 0 < width <= logits.shape[1]
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.kv_argmax_rows(logits.data_ptr(), logits.stride(0), width, logits.shape[0], out.data_ptr())
    return out


def mask_logits(logits: torch.Tensor, bits: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[r], t] = -inf wherever bit t of bits[r] (int32 words, 32 tokens each) is
    clear, and for every t past the bitmask's width. logits float32 [B, V] contiguous on the CPU."""
    lib = _ready_lib()
    assert logits.dtype == torch.float32 and logits.is_contiguous() and bits.dtype == torch.int32
    bits, rows = bits.contiguous(), rows.to(torch.int64).contiguous()
    assert bits.shape[0] == rows.shape[0] and (rows.numel() == 0 or int(rows.max()) < logits.shape[0])
    lib.kv_mask_logits(logits.data_ptr(), logits.shape[1], logits.shape[1], bits.data_ptr(), bits.shape[1],
                       rows.data_ptr(), rows.shape[0])
