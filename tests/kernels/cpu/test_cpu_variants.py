"""Every native CPU kernel variant this machine runs (AVX-512, AVX2, NEON) against the portable
scalar build of the same sources, on random data, and the dispatch's choice of variant.

The integer dot products are exact on every ISA and each output lane takes the same float
operations in the same order, so quantizers and GEMMs must agree bit for bit; attention sums
over lanes in a tree that differs by ISA, so it agrees to rounding.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from kvserve.kernels import cpu as native
from kvserve.kernels.testing import clone_cache, make_case
from kvserve.layers.attention import KVCache
from kvserve.quant.int4 import quantize_q4
from kvserve.quant.int8 import quantize_rows

VARIANTS = [isa for isa in native.supported_isas() if isa != "scalar"]
pytestmark = pytest.mark.skipif(not VARIANTS, reason="this CPU runs no SIMD variant (scalar only)")


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def test_dispatch_picks_the_best_isa_the_cpu_reports(monkeypatch):
    flags, machine = _flags(), platform.machine().lower()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
        want = "avx512"
    elif {"avx2", "fma", "f16c", "avx_vnni"} <= flags:
        want = "avxvnni"
    elif {"avx2", "fma", "f16c"} <= flags:
        want = "avx2"
    elif machine in ("aarch64", "arm64"):
        want = "neon"
    else:
        want = None
    monkeypatch.delenv("KVSERVE_CPU_ISA", raising=False)
    assert native.engine_isa() == want
    assert native.supported_isas()[-1] == "scalar" and native.supported_isas()[0] == (want or "scalar")
    if want is not None:
        assert native.isa() == want  # the library the engine loaded is that variant
    monkeypatch.setenv("KVSERVE_CPU_ISA", "scalar")
    assert native.engine_isa() == "scalar"  # forced, for benchmarks: any variant the CPU runs


def _both(isa: str, fn):
    """fn() under the variant and under the scalar reference."""
    with native.use_isa(isa):
        got = fn()
    with native.use_isa("scalar"):
        want = fn()
    return got, want


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m, k", [(1, 576), (5, 100), (3, 17), (8, 1536)])
def test_activation_quantizers_bit_identical(isa, m, k):
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 3
    x[0, :10] = 0
    got, want = _both(isa, lambda: (native.quantize_act(x), native.quantize_act_s8(x), native.quantize_act_s8h(x)))
    assert torch.equal(got[2][0], got[1][0]) and torch.equal(got[2][3].sum(-1).float() * got[2][1], got[1][2])
    for a, b in zip([*got[0], *got[1], *got[2]], [*want[0], *want[1], *want[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (3, 576, 33), (4, 64, 16), (6, 64, 48), (7, 100, 9), (13, 1536, 49),
                                     (64, 96, 80)])
def test_gemms_bit_identical(isa, m, k, n):
    g = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    w = torch.randn(n, k, generator=g)
    q8, s8 = quantize_rows(w)
    q4, d4, m4 = quantize_q4(w)

    g16 = 2 * -(-k // 32)
    wide = {bits: (torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8),
                   (torch.rand(n, g16, generator=g) * 0.02 + 0.001).half(), (-torch.rand(n, g16, generator=g)).half())
            for bits in (5, 6, 8)}

    def run():
        wp, corr = native.pack_weight(q8)
        w4 = native.pack_q4(q4, d4, m4)
        ws = [native.wide_gemm(x, native.pack_wide(*wide[b], b), n, b) for b in wide]
        return native.qgemm(x, wp, s8, corr), native.q4gemm(x, w4, n), *ws, native.linear_f32(x, w, bias)

    bias = torch.randn(n, generator=g)
    got, want = _both(isa, run)
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))
    y8, r8 = got[0], want[0]
    assert float((y8 - x @ (q8.float() * s8[:, None]).T).abs().max()) < 0.03 * float(r8.abs().max())
    # float32: one fused multiply-add per product, lanes summed by one tree on every ISA
    torch.testing.assert_close(got[-1], torch.nn.functional.linear(x.double(), w.double(), bias.double()).float(),
                               rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float16])
@pytest.mark.parametrize("q_lens, seq_lens", [([1] * 5, [1, 17, 200, 33, 64]), ([33, 1, 70, 5], [700, 90, 70, 5]),
                                              ([2, 31, 65], [2, 95, 300])])
def test_attention_matches_scalar(isa, cache_dtype, q_lens, seq_lens):
    case = make_case(q_lens, seq_lens, 9, 3, 64, block_size=16, int8=cache_dtype == torch.int8, seed=len(q_lens))
    t = clone_cache(case.kv_cache)
    if cache_dtype in (torch.bfloat16, torch.float16):
        t = tuple(x.to(cache_dtype) for x in t)
    cache = KVCache(*t)
    q, meta = case.q.contiguous(), case.meta
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]

    def run():
        out = torch.zeros_like(q)
        if decodes:
            rows = torch.tensor([starts[i] for i in decodes])
            out[rows] = native.paged_decode_attention(q[rows].contiguous(), cache.k, cache.v, cache.k_scale,
                                                      cache.v_scale, meta.block_tables[decodes],
                                                      meta.seq_lens[decodes], 0.125)
        ext = [0 if n == 1 else n for n in q_lens]
        native.paged_prefill_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, meta.block_tables, starts,
                                       ext, seq_lens, 0.125, out)
        return out

    got, want = _both(isa, run)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("isa", [*VARIANTS, "scalar"])
def test_invariances_hold_on_every_variant(isa):
    """Batched == alone (decode attention, the int8, int4 and float32 GEMMs) and chunked == whole (prefill
    attention), bit for bit."""
    with native.use_isa(isa):
        case = make_case([1] * 6, [3, 50, 17, 16, 90, 1], 9, 3, 64, seed=3)
        cache = KVCache(*case.kv_cache)
        q, tables, lens = case.q.contiguous(), case.meta.block_tables, case.meta.seq_lens
        full = native.paged_decode_attention(q, cache.k, cache.v, None, None, tables, lens, 0.125)
        for i in range(6):
            one = native.paged_decode_attention(q[i : i + 1], cache.k, cache.v, None, None, tables[i : i + 1],
                                                lens[i : i + 1], 0.125)
            assert torch.equal(one, full[i : i + 1])
        # rows over one block table (a speculative verify's, a prompt's one-token rows), across a part
        # boundary (64 tokens) and more than one group of 16: each equals itself alone (a lone row reads
        # a 16-bit or int8 cache in place, a group through one converted copy of each block)
        one_seq = make_case([1], [100], 9, 3, 64, seed=4)
        int8_seq = make_case([1], [100], 9, 3, 64, seed=4, int8=True)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
            k, v, ks, vs = (int8_seq.kv_cache if dtype == torch.int8
                            else (*(t.to(dtype) for t in one_seq.kv_cache), None, None))
            lens = torch.tensor([58 + i for i in range(20)] + [100, 3], dtype=torch.int32)
            table = one_seq.meta.block_tables.expand(len(lens), -1).contiguous()
            qs = torch.randn(len(lens), 9, 64)
            full = native.paged_decode_attention(qs, k, v, ks, vs, table, lens, 0.125)
            for i in range(len(lens)):
                alone = native.paged_decode_attention(qs[i : i + 1], k, v, ks, vs, table[i : i + 1],
                                                      lens[i : i + 1], 0.125)
                assert torch.equal(alone, full[i : i + 1]), (dtype, i)
        x, w = torch.randn(23, 576), torch.randn(200, 576)
        q8, s8 = quantize_rows(w)
        wp, corr = native.pack_weight(q8)
        w4 = native.pack_q4(*quantize_q4(w))
        y8, y4, yf = native.qgemm(x, wp, s8, corr), native.q4gemm(x, w4, 200), native.linear_f32(x, w)
        for rows in ([0], [5, 6, 7], list(range(4, 12)), [22, 0, 13, 1, 2]):
            assert torch.equal(native.qgemm(x[rows].contiguous(), wp, s8, corr), y8[rows])
            assert torch.equal(native.q4gemm(x[rows].contiguous(), w4, 200), y4[rows])
            assert torch.equal(native.linear_f32(x[rows], w), yf[rows])
        n = 150
        pcase = make_case([n], [n], 9, 3, 64, seed=11)
        pc, pq, table = KVCache(*pcase.kv_cache), pcase.q.contiguous(), pcase.meta.block_tables

        def attend(lo: int, hi: int) -> torch.Tensor:
            out = torch.empty(hi - lo, 9, 64)
            native.paged_prefill_attention(pq[lo:hi].contiguous(), pc.k, pc.v, None, None, table, [0], [hi - lo], [hi],
                                           0.125, out)
            return out

        whole = attend(0, n)
        assert torch.equal(torch.cat([attend(0, 37), attend(37, n)]), whole)
        assert torch.equal(torch.cat([attend(0, 100)] + [attend(t, t + 2) for t in range(100, n, 2)]), whole)


@pytest.mark.parametrize("isa", [*VARIANTS, "scalar"])
def test_float16_cache_rows_convert_as_torch_does(isa):
    """The fused step writes a float16 cache row by row in C; the torch path converts with torch."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-9, 6, (4000,), generator=g),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25,
                                 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), float("inf"),
                                 -float("inf")]),
                   (torch.arange(1, 2049, dtype=torch.float32) + 0.5) * 2.0 ** -10])  # ties
    out = torch.empty(x.numel(), dtype=torch.int16)
    with native.use_isa(isa):
        native.library._lib().kv_to_f16(x.data_ptr(), x.numel(), out.data_ptr())
    assert torch.equal(out.view(torch.float16), x.to(torch.float16))
    nan, src = torch.empty(1, dtype=torch.int16), torch.tensor([float("nan")])
    with native.use_isa(isa):
        native.library._lib().kv_to_f16(src.data_ptr(), 1, nan.data_ptr())
    assert nan.view(torch.float16).isnan().all()


@pytest.mark.parametrize("isa", [*VARIANTS, "scalar"])
def test_embedding_rows_from_the_packed_head_as_torch_reads_them(isa):
    """A tied table's lookup (kv_embed_rows) reads the LM head's packed int8 bytes: the same floats as
    unpacking the rows with torch and scaling them, for ids in every position of a 16-row block."""
    from kvserve.quant.int8 import Int8Weight

    g = torch.Generator().manual_seed(5)
    with native.use_isa(isa):
        w = Int8Weight(torch.randn(70, 81, generator=g))  # rows and width not multiples of 16 / 32
        ids = torch.tensor([[0, 15, 16, 69], [33, 1, 68, 47]])
        ref = w.rows(ids).float() * w.scale[ids].unsqueeze(-1)
        assert torch.equal(native.embed_rows(w.q, w.scale, w.in_features, ids), ref)


def test_float_linears_take_the_few_row_kernel_up_to_its_row_limit(monkeypatch):
    """Linear layers with float32 weights: steps of up to f32_few_rows() tokens by the native kernel (the
    weight read once for all rows, each row's bits independent of the others), longer ones by torch."""
    from kvserve.kernels.cpu import ops
    from kvserve.layers.linear import Linear

    limit = ops.f32_few_rows()
    assert limit == ops.F32_FEW_ROWS[native.isa()] > 0
    lin = Linear(96, 50, bias=True)
    with torch.no_grad():
        lin.weight.normal_(), lin.bias.normal_()
    calls = []
    real = ops.linear_f32
    monkeypatch.setattr(ops, "linear_f32", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(limit + 5, 96)
    with torch.inference_mode():
        whole = lin(x)  # torch
        rows = [lin(x[i : i + 1].view(1, 1, 96)).view(1, 50) for i in range(limit + 5)]  # native, any leading shape
        few = lin(x[:limit])  # native
    assert calls == [(1, 1, 96)] * (limit + 5) + [(limit, 96)]
    assert torch.equal(torch.cat(rows[:limit]), few)  # batched == alone, bit for bit
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat(rows), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", [*VARIANTS, "scalar"])
@pytest.mark.parametrize("width", [1, 17, 255, 256, 1000, 49152])
def test_argmax_rows_is_torchs_argmax(isa, width):
    g = torch.Generator().manual_seed(width)
    rows = [torch.randn(width + 5, generator=g) for _ in range(9)]
    if width > 1:
        rows[1][width // 2] = rows[1][width - 1] = 50.0  # a tie: the first index
        rows[2][width // 3] = float("nan")  # a NaN is the largest
        rows[3][: width // 2] = float("-inf")  # masked tokens
        rows[4][width - 1] = 100.0  # the largest in the tail past the last whole block
        rows[5][width // 4] = float("inf")
        rows[6][:] = -0.0
        rows[6][width - 1] = 0.0  # -0.0 and 0.0 tie: the first
        rows[7][0] = 1e30
    rows[8][width:] = 1e9  # past the width: never read
    logits = torch.stack(rows)
    with native.use_isa(isa):
        got = native.argmax_rows(logits, width)
        whole = native.argmax_rows(logits[:, :width].contiguous())
    want = logits[:, :width].argmax(dim=-1)
    assert torch.equal(got, want) and torch.equal(whole, want)
    assert torch.equal(native.argmax_rows(logits[:, :width]), want)  # a view: rows strided by the full width
