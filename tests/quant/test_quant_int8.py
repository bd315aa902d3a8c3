"""The W8A8 int8 linear method: native VNNI kernel against its torch reference, exactness
properties, and the quantized default model's behaviour."""

from __future__ import annotations

import pytest
import torch

from kvserve.kernels import cpu as native
from kvserve.quant.int8 import Int8Weight, quantize_groups, reference_qgemm, unpack

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler or no SIMD ISA (AVX-512, AVX2, NEON)")

SHAPES = [(1, 576, 960), (4, 64, 16), (5, 64, 12), (7, 100, 9), (3, 17, 5), (13, 1536, 49), (64, 96, 80)]


@needs_native
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_kernel_matches_reference(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    # uneven magnitudes across columns and rows, plus an all-zero row
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    x[0, : min(k, 40)] = 0
    w = torch.randn(n, k, generator=g)
    wt = Int8Weight(w)
    q = unpack(wt.q, n, k)
    assert torch.equal(q, torch.round(w / wt.scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
    y = wt.matmul(x)
    ref = reference_qgemm(x, q, wt.scale)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and the quantization error against the float product stays at int8 level
    exact = x @ w.T
    assert float((y - exact).abs().max()) < 0.03 * float(exact.abs().max())


@needs_native
def test_kernel_rows_do_not_depend_on_the_batch():
    """Every row alone equals the same row inside any batch, bit for bit (all tile shapes)."""
    x = torch.randn(23, 576)
    wt = Int8Weight(torch.randn(200, 576))
    full = wt.matmul(x)
    for rows in ([0], [5, 6, 7], list(range(4, 12)), [22, 0, 13, 1, 2]):
        assert torch.equal(wt.matmul(x[rows]), full[rows])


@needs_native
def test_activation_quantizer_matches_torch():
    x = torch.randn(9, 70) * 3
    x[2] = 0
    x[3, 5] = 0.5 * 127 / 127  # exact ties round to even in both
    xq, dx = native.quantize_act(x)
    q, d = quantize_groups(x)
    assert torch.equal(dx, d.float())
    assert torch.equal(xq.view(9, -1, 32).to(torch.int32) - 128, q.to(torch.int32))


def test_reference_path_without_native(monkeypatch):
    """The torch fallback computes the same numbers as the kernel would."""
    w = torch.randn(33, 64)
    monkeypatch.setattr(native, "available", lambda: False)
    wt = Int8Weight(w)
    assert not wt.native
    x = torch.randn(3, 64)
    y = wt.matmul(x)
    torch.testing.assert_close(y, reference_qgemm(x, wt.q, wt.scale))
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=0.03 * float((x @ w.T).abs().max()))


def test_linear_quantize_keeps_bias_and_dtype():
    from kvserve.layers.linear import Linear

    lin = Linear(64, 48, bias=True)
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    x = torch.randn(5, 64).bfloat16()
    ref = lin(x.float())
    lin.quantize("int8")
    assert lin.weight is None and [n for n, _ in lin.named_parameters()] == ["bias"]
    y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=0.05 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="unknown quantization"):
        Linear(4, 4).quantize("fp4")


@needs_native
@pytest.mark.parametrize("n,k", [(64, 96), (48, 100), (40, 64)])
def test_in_place_pack_writes_the_same_layout(n, k):
    """Packing over the rows themselves (N % 16 == 0, K % 32 == 0) gives the copy's bytes; other
    shapes fall back to a copy and leave the rows alone."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n + k))
    rows = q.clone()
    want, want_corr = native.pack_weight(q)
    got, got_corr = native.pack_weight(rows, inplace=True)
    assert torch.equal(got, want) and torch.equal(got_corr, want_corr)
    shares = got.data_ptr() == rows.data_ptr()
    assert shares == (n % 16 == 0 and k % 32 == 0)
    assert shares or torch.equal(rows, q)
    assert torch.equal(unpack(got, n, k), q)
