"""The W4A8 int4 linear method: native kernel against its torch reference, the quantizer against
GGUF Q4_1 blocks, batch invariance, and the quantized default model's quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve.kernels import cpu as native
from kvserve.quant.int4 import Int4Weight, dequantize_q4, quantize_q4, reference_q4gemm

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler or no SIMD ISA (AVX-512, AVX2, NEON)")

SHAPES = [(1, 576, 960), (4, 64, 16), (5, 64, 12), (7, 100, 9), (3, 17, 5), (13, 1536, 49), (64, 96, 80)]


def test_quantizer_bounds_and_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 100, generator=g) * torch.rand(40, 1, generator=g)
    w[3] = 0.25  # a constant row: scale 0, every code 0, exact
    q, d, m = quantize_q4(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.shape == m.shape == (40, 4)
    back = dequantize_q4(q, d, m)
    assert torch.equal(back[3], torch.full((100,), 0.25))
    # each value within half a step (plus fp16 rounding of scale and minimum) of the original
    step = torch.nn.functional.pad(d.float(), (0, 0)).repeat_interleave(32, dim=1)[:, :100]
    assert bool(((back - w).abs() <= 0.5 * step + 2e-3 * w.abs().amax(1, keepdim=True)).all())


@needs_native
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_kernel_matches_reference(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    x[0, : min(k, 40)] = 0
    w = torch.randn(n, k, generator=g)
    wt = Int4Weight(w)
    q, d, mn = quantize_q4(w)
    assert torch.equal(wt.codes(), q)  # the packed layout holds exactly the quantizer's codes
    y = wt.matmul(x)
    ref = reference_q4gemm(x, q, d, mn)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # against the float product of the dequantized weights: only the int8 activations' error is left
    exact = x @ dequantize_q4(q, d, mn).T
    assert float((y - exact).abs().max()) < 0.03 * float(exact.abs().max())


@needs_native
def test_kernel_rows_do_not_depend_on_the_batch():
    x = torch.randn(23, 576)
    wt = Int4Weight(torch.randn(200, 576))
    full = wt.matmul(x)
    for rows in ([0], [5, 6, 7], list(range(4, 12)), [22, 0, 13, 1, 2]):
        assert torch.equal(wt.matmul(x[rows]), full[rows])


def test_reference_path_without_native(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    w = torch.randn(33, 64)
    wt = Int4Weight(w)
    assert not wt.native
    x = torch.randn(3, 64)
    q, d, m = quantize_q4(w)
    torch.testing.assert_close(wt.matmul(x), reference_q4gemm(x, q, d, m))


def _q4_1_blocks(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 bytes -> codes [N, K], d, m [N, K/32]: per block fp16 d, fp16 m, 16 bytes of nibbles
    (element i in the low nibble of byte i, element i + 16 in its high nibble)."""
    blocks = np.ascontiguousarray(raw).reshape(n, k // 32, 20)
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16)[..., 0])
    m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0])
    qs = torch.from_numpy(blocks[:, :, 4:].copy())
    codes = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, k)
    return codes, d, m


@pytest.mark.slow
def test_quantizer_recovers_the_gguf_q4_1_codes(default_path):
    """Re-quantizing a Q4_1 tensor's float values gives back its own codes, scales and minimums."""
    from kvserve.loader.gguf import GGUFFile

    f = GGUFFile(default_path)
    for name in ("blk.0.ffn_down.weight", "blk.7.attn_output.weight", "blk.29.ffn_up.weight"):
        kind, raw = f.raw_tensor(name)
        assert kind == "Q4_1"
        w = f.dequantize(name)
        codes, d, m = _q4_1_blocks(raw, *w.shape)
        q2, d2, m2 = quantize_q4(w)
        assert torch.equal(d2, d) and torch.equal(m2, m)
        assert torch.equal(q2, codes)


@pytest.mark.slow
def test_int4_default_model(default_path, smollm, smollm_ppl):
    """`auto` runs the Q4_1 GGUF's layers on the int4 kernel; perplexity stays within 1% of the float model's."""
    from kvserve.eval.perplexity import perplexity
    from kvserve.loader import load_model
    from helpers import CTX, ppl_text

    if not native.available():
        pytest.skip("no native kernels")
    lm = load_model(default_path, quantization="auto")
    assert lm.quantization == "gguf" and "gguf weights" in lm.describe()
    from kvserve.quant.int4 import Int4Weight

    assert all(isinstance(m.qweight, Int4Weight) for m in lm.model.model.layers.modules() if hasattr(m, "qweight"))
    assert lm.weight_bytes < 0.45 * smollm.weight_bytes  # 4 bits per layer weight, int8 LM head, float embedding
    base = smollm_ppl.ppl
    q4 = perplexity(lm, ppl_text(), ctx=CTX).ppl
    assert abs(q4 - base) / base < 0.01, (q4, base)
