"""4-bit GGUF formats taken as the int4 kernel's codes and scales: blocks of Q4_0, Q4_1 and Q4_K
made by a packer of this file's own, checked against gguf.quants.dequantize (the reference
implementation), and a tiny Q4_0 model whose layers keep exactly the file's codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from helpers import make_tiny_hf
from kvserve.quant.gguf import q4_parts
from kvserve.quant.int4 import dequantize_q4


def pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [B, 32] in 0..15, d [B] fp16 -> Q4_0 blocks: d, then byte j = code j | code j+16 << 4."""
    qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           m.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


def pack_q4_k(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """codes [B, 256] in 0..15; d, dmin [B] fp16; sc, mn [B, 8] 6-bit sub-block scales and minimums."""
    b = codes.shape[0]
    packed = np.zeros((b, 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    c = codes.reshape(b, 4, 2, 32)  # chunk of 64: the first 32 in low nibbles, the next 32 in high
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(b, 128)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), packed, qs], axis=1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_parts_reproduce_the_reference_dequantization(qtype):
    rng = np.random.default_rng(len(qtype))
    n, k = 24, 512
    per = 256 if qtype == "Q4_K" else 32
    nb = n * k // per
    codes = rng.integers(0, 16, size=(nb, per)).astype(np.uint8)
    d = (rng.random(nb) * 0.05 + 0.001).astype(np.float16)
    if qtype == "Q4_0":
        raw = pack_q4_0(codes, d)
    elif qtype == "Q4_1":
        raw = pack_q4_1(codes, d, (-rng.random(nb) * 0.3).astype(np.float16))
    else:
        raw = pack_q4_k(codes, d, (rng.random(nb) * 0.02).astype(np.float16),
                        rng.integers(0, 64, size=(nb, 8)).astype(np.uint8), rng.integers(0, 64, size=(nb, 8)).astype(np.uint8))
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    q, dd, mm = q4_parts(raw, qtype, (n, k))
    assert q.dtype == torch.uint8 and dd.dtype == mm.dtype == torch.float16 and dd.shape == (n, k // 32)
    assert torch.equal(q.reshape(-1, per), torch.from_numpy(codes))  # the file's own codes
    got = dequantize_q4(q, dd, mm)
    if qtype == "Q4_K":  # group scales rounded to fp16: within 1e-3 of the value range
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    else:
        assert torch.equal(got, want)


def test_a_q4_0_model_keeps_the_files_codes(tmp_path):
    """Requantizing Q4_0's floats by min and max would not recover codes of groups that miss 0 or 15;
    the int4 layers hold the file's codes and scales exactly."""
    import gguf

    from helpers import write_tiny_llama_gguf
    from kvserve.loader import load_model
    from kvserve.loader.gguf import GGUFFile

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    path = write_tiny_llama_gguf(hf, tmp_path / "q4_0.gguf", qtype="Q4_0")
    src = GGUFFile(path)
    lm = load_model(str(path), quantization="int4")
    layer = lm.model.model.layers[1]
    for lin, names in ((layer.mlp.down_proj, ["blk.1.ffn_down.weight"]),
                       (layer.mlp.gate_up_proj, ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"])):
        parts = [src._q4_parts(nm) for nm in names]
        assert all(p is not None for p in parts)
        want_q = torch.cat([p[0] for p in parts])
        want_d = torch.cat([p[1] for p in parts])
        assert src.tensors[names[0]].tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert torch.equal(lin.qweight.codes(), want_q) and torch.equal(lin.qweight.d, want_d)
        want_float = torch.cat([src.dequantize(nm) for nm in names])
        assert torch.equal(lin.qweight.dequantize(), want_float)  # the file's weights, bit for bit
