"""GGUF formats taken as the native kernels' codes and scales: blocks of Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K and Q8_0 made by packers of the tests' own (gguf_blocks.py), checked against
gguf.quants.dequantize (the reference implementation); the 5/6/8-bit kernel against its torch
arithmetic; tiny models whose layers keep exactly the file's codes, in one format or mixed as
llama.cpp's Q4_K_M mixes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from gguf_blocks import pack_q4_k, pack_q5_k, pack_q6_k
from helpers import make_tiny_hf, write_tiny_llama_gguf
from kvserve.kernels import cpu as native
from kvserve.quant.gguf import BlockParts, native_parts, q4_parts
from kvserve.quant.int4 import dequantize_q4
from kvserve.quant.wide import WideWeight, reference_wide_gemm


def pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [B, 32] in 0..15, d [B] fp16 -> Q4_0 blocks: d, then byte j = code j | code j+16 << 4."""
    qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           m.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


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

    from kvserve.loader import load_model
    from kvserve.loader.gguf import GGUFFile

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    path = write_tiny_llama_gguf(hf, tmp_path / "q4_0.gguf", qtype="Q4_0")
    src = GGUFFile(path)
    lm = load_model(str(path), quantization="int4")
    layer = lm.model.model.layers[1]
    for lin, names in ((layer.mlp.down_proj, ["blk.1.ffn_down.weight"]),
                       (layer.mlp.gate_up_proj, ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"])):
        parts = [src.native_parts(nm) for nm in names]
        assert all(p is not None and p.bits == 4 for p in parts)
        want_q = torch.cat([p.codes for p in parts])
        want_d = torch.cat([p.scale for p in parts])
        assert src.tensors[names[0]].tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert torch.equal(lin.qweight.codes(), want_q) and torch.equal(lin.qweight.d, want_d)
        want_float = torch.cat([src.dequantize(nm) for nm in names])
        assert torch.equal(lin.qweight.dequantize(), want_float)  # the file's weights, bit for bit


def _random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes and scales of `qtype` packed to its blocks (rows of [N, K])."""
    nb = n * k // 256
    codes = lambda bits: rng.integers(0, 2 ** bits, size=(nb, 256)).astype(np.uint8)  # noqa: E731
    d = (rng.random(nb) * 0.01 + 0.0005).astype(np.float16)
    six = lambda: rng.integers(0, 64, size=(nb, 8)).astype(np.uint8)  # noqa: E731
    if qtype in ("Q8_0", "Q5_0", "Q5_1"):  # gguf-py quantizes these itself
        import gguf

        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[qtype])
    if qtype == "Q6_K":
        return pack_q6_k(codes(6), rng.integers(-128, 128, size=(nb, 16)), d)
    if qtype == "Q5_K":
        return pack_q5_k(codes(5), d, (rng.random(nb) * 0.01).astype(np.float16), six(), six())
    return pack_q4_k(codes(4), d, (rng.random(nb) * 0.01).astype(np.float16), six(), six())


def _dequantized(p: BlockParts) -> torch.Tensor:
    n, k = p.shape
    g = p.scale.shape[1]
    q = p.codes.float().view(n, g, k // g)
    return (q * p.scale.float().unsqueeze(2) + p.minimum.float().unsqueeze(2)).view(n, k)


@pytest.mark.parametrize("qtype, bits", [("Q4_K", 4), ("Q5_0", 5), ("Q5_1", 5), ("Q5_K", 5), ("Q6_K", 6),
                                         ("Q8_0", 8)])
def test_native_parts_reproduce_the_reference_dequantization(qtype, bits):
    rng = np.random.default_rng(bits)
    n, k = 16, 512
    raw = _random_blocks(qtype, n, k, rng)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    p = native_parts(raw, qtype, (n, k))
    assert p.bits == bits and p.codes.dtype == torch.uint8 and int(p.codes.max()) < 2 ** bits
    assert int(p.codes.max()) >= 2 ** bits * 3 // 4  # the top bits really are read
    got = _dequantized(p)
    if qtype in ("Q8_0", "Q5_0"):
        assert torch.equal(got, want)
    elif qtype == "Q5_1":  # d q + m in float32 against gguf's own order of the same operations
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    else:  # sub-block scales rounded to fp16
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
@pytest.mark.parametrize("bits", [5, 6, 8])
@pytest.mark.parametrize("m, k, n", [(1, 512, 96), (5, 256, 40), (13, 1536, 49)])
def test_wide_kernel_matches_its_arithmetic(bits, m, k, n):
    g = torch.Generator().manual_seed(bits * 100 + m)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    s = (torch.rand(n, k // 16, generator=g) * 0.01 + 0.001).half()
    mn = (-(2 ** (bits - 1)) * s.float() * (1 + 0.1 * torch.rand(n, k // 16, generator=g))).half()
    parts = BlockParts(bits, codes, s, mn)
    x = torch.randn(m, k, generator=g) * 3
    w = WideWeight(parts)
    y = w.matmul(x)
    want = reference_wide_gemm(x, parts)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))
    exact = x @ _dequantized(parts).T  # activations in int8 groups of 32: about 1% off the float product
    assert float((y - exact).abs().max()) < 0.02 * float(exact.abs().max())
    rows = torch.cat([w.matmul(x[i : i + 1]) for i in range(m)])
    assert torch.equal(rows, y)  # a row does not depend on its batch


def test_mixed_fused_shards_take_the_widest_format():
    g = torch.Generator().manual_seed(0)
    q4 = BlockParts(4, torch.randint(0, 16, (8, 64), generator=g).to(torch.uint8),
                    torch.rand(8, 2, generator=g).half(), -torch.rand(8, 2, generator=g).half())
    q6 = BlockParts(6, torch.randint(0, 64, (4, 64), generator=g).to(torch.uint8),
                    torch.rand(4, 4, generator=g).half(), -torch.rand(4, 4, generator=g).half())
    both = BlockParts.cat([q4, q6])
    assert both.bits == 6 and both.scale.shape == (12, 4)
    assert torch.equal(_dequantized(both), torch.cat([_dequantized(q4), _dequantized(q6)]))


K_QUANT_MIX = {"attn_q": "Q5_0", "attn_v": "Q6_K", "ffn_down": "Q6_K", "ffn_gate": "Q5_1", "ffn_up": "Q5_K",
               "attn_output": "Q8_0", "*": "Q4_K"}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A tiny Llama (rows of 256) stored as Q4_K_M-like mixed types."""
    tmp = tmp_path_factory.mktemp("kq")
    hf = make_tiny_hf(tmp / "hf", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2)
    return write_tiny_llama_gguf(hf, tmp / "mixed.gguf", qtype=K_QUANT_MIX)


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
def test_a_mixed_k_quant_model_runs_each_layer_in_its_own_format(mixed_gguf):
    from kvserve.loader import load_model
    from kvserve.loader.gguf import GGUFFile

    src = GGUFFile(mixed_gguf)
    lm = load_model(str(mixed_gguf), quantization="auto")  # the engine default
    assert lm.quantization == "gguf"
    layer = lm.model.model.layers[0]
    kinds = {name: (type(lin.qweight).__name__, getattr(lin.qweight, "bits", 4)) for name, lin in (
        ("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj), ("gate_up", layer.mlp.gate_up_proj),
        ("down", layer.mlp.down_proj))}
    # q Q5_0, k Q4_K and v Q6_K: the fused qkv takes 6 bits; gate Q5_1 + up Q5_K: 5 bits
    assert kinds == {"qkv": ("WideWeight", 6), "o": ("WideWeight", 8), "gate_up": ("WideWeight", 5),
                     "down": ("WideWeight", 6)}
    # each linear computes with the file's own weights: against the float product of the dequantized file
    x = torch.randn(3, 512)
    want = x @ src.dequantize("blk.0.ffn_down.weight").T
    got = layer.mlp.down_proj(x)
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
    # and the model agrees with its float twin (the same dequantized weights, no int8 activations)
    ref = load_model(str(mixed_gguf), quantization="none")
    ids = torch.tensor([3, 17, 42, 99, 5])
    from helpers import run_prefill

    got_logits, ref_logits = run_prefill(lm.model, [ids.tolist()])[0], run_prefill(ref.model, [ids.tolist()])[0]
    assert float((got_logits - ref_logits).abs().max()) < 0.05 * float(ref_logits.abs().max())


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
def test_a_mixed_k_quant_model_decodes_through_the_fused_step_batch_invariantly(mixed_gguf):
    from kvserve import LLM, SamplingParams

    llm = LLM(str(mixed_gguf), max_model_len=128, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.native is not None  # every layer's format runs in the fused step
    calls = []
    real = runner.native.forward
    runner.native.forward = lambda *a: calls.append(len(a[0])) or real(*a)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[3, 17, 42, 99], [5, 6, 7], [11, 12, 13, 14, 15, 16], [20]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls.count(len(prompts)) >= 10  # the decode steps of the whole batch went through it
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)
