"""`kvserve quantize ... --out DIR`: a Hugging Face directory with the linears in the GPTQ checkpoint layout.

The written tensors are decoded here by an unpacker of the documented layout written for the test (bit by
bit, not kvserve's packer), which must give exactly the weights kvserve's quantizer left in the model; the
directory loads back in kvserve to the same tensors and greedy tokens as the GGUF of the same grid."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import split_text
from kvserve import LLM, SamplingParams
from kvserve.entrypoints.cli import main
from kvserve.errors import ModelLoadError
from kvserve.kernels import cpu as native
from kvserve.loader import load_model
from kvserve.quant.calibrate import calibration_chunks
from kvserve.quant.compress import quantize_model
from kvserve.quant.export_hf import write_gptq_dir
from kvserve.quant.grid import gptq_grid

# kvserve linear -> its HF projections (shard id in the fused rows, None: the whole linear)
PROJECTIONS = {"self_attn.qkv_proj": [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")],
               "self_attn.o_proj": [("self_attn.o_proj", None)],
               "mlp.gate_up_proj": [("mlp.gate_proj", 0), ("mlp.up_proj", 1)], "mlp.down_proj": [("mlp.down_proj", None)]}


def read_stream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 [W, C] -> [count, C]: value r of column c is bits r * bits .. of the column's words read as one
    little-endian bit stream (bit p of the stream: bit p % 32 of word p // 32)."""
    u = words.view(np.uint32).astype(np.int64)
    out = np.zeros((count, u.shape[1]), dtype=np.int64)
    for r in range(count):
        for b in range(bits):
            p = r * bits + b
            out[r] |= ((u[p // 32] >> (p % 32)) & 1) << b
    return out


def gptq_dequantize(t: dict[str, np.ndarray], name: str, bits: int) -> np.ndarray:
    """w [N, K] = scales[g, n] * (q[k, n] - (stored zero[g, n] + 1)), g = g_idx[k], in float32."""
    scales, g_idx = t[f"{name}.scales"], t[f"{name}.g_idx"]
    k, n = g_idx.shape[0], scales.shape[1]
    q = read_stream(t[f"{name}.qweight"], bits, k)  # [K, N]
    zeros = read_stream(np.ascontiguousarray(t[f"{name}.qzeros"].T), bits, n).T + 1  # [G, N]
    s = scales.astype(np.float32)[g_idx]  # [K, N]
    return (s * (q - zeros[g_idx]).astype(np.float32)).T


def quantized(tiny_gguf, tmp_path, bits, sym, group, method="rtn"):
    lm = load_model(tiny_gguf)
    chunks = None if method == "rtn" else calibration_chunks(lm, split_text()[0], 512, 256)
    comp = quantize_model(lm, method, gptq_grid(bits, sym, group), chunks)
    write_gptq_dir(lm, comp, tmp_path / "out", bits, group, sym)
    return lm, tmp_path / "out"


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [16, 32])
def test_the_written_layout_decodes_to_exactly_the_quantized_weights(tiny_gguf, tmp_path, bits, sym, group):
    lm, out = quantized(tiny_gguf, tmp_path, bits, sym, group)
    t = load_file(str(out / "model.safetensors"))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
                 "checkpoint_format": "gptq", "lm_head": False}
    for i, layer in enumerate(lm.model.model.layers):
        for path, projections in PROJECTIONS.items():
            lin = layer.get_submodule(path)
            for hf, sid in projections:
                name = f"model.layers.{i}.{hf}"
                off, size = lin.shard_offsets[sid] if sid is not None else (0, lin.out_features)
                assert t[f"{name}.qweight"].dtype == np.int32 and t[f"{name}.scales"].dtype == np.float16
                assert np.array_equal(t[f"{name}.g_idx"], np.arange(lin.in_features) // group)
                assert t[f"{name}.qweight"].shape == (lin.in_features * bits // 32, size)
                assert t[f"{name}.qzeros"].shape == (lin.in_features // group, size * bits // 32)
                assert np.array_equal(gptq_dequantize(t, name, bits), lin.weight[off : off + size].numpy()), name
    assert np.array_equal(t["model.embed_tokens.weight"], lm.model.model.embed_tokens.weight.numpy())
    assert np.array_equal(t["model.layers.1.input_layernorm.weight"],
                          lm.model.model.layers[1].input_layernorm.weight.numpy())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_write_the_same_layout(tiny_gguf, tmp_path, method):
    lm, out = quantized(tiny_gguf, tmp_path, 4, False, 32, method)
    t = load_file(str(out / "model.safetensors"))
    down = lm.model.model.layers[1].mlp.down_proj.weight.numpy()
    assert np.array_equal(gptq_dequantize(t, "model.layers.1.mlp.down_proj", 4), down)
    # AWQ's scales folded into the norms: the directory holds the rescaled norms
    norm = lm.model.model.layers[0].post_attention_layernorm.weight.numpy()
    assert np.array_equal(t["model.layers.0.post_attention_layernorm.weight"], norm)
    back = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), back.model.state_dict().values()))


def test_an_hf_source_keeps_its_config_and_tokenizer_files(tmp_path, capsys):
    """An HF source (Qwen2: q/k/v biases, split out of the fused projection like the weights) keeps its
    config.json, plus the quantization_config, and its tokenizer files as they are; a GPTQ directory
    is a source too (its float dequantization the reference)."""
    from helpers import make_tiny_hf

    src = make_tiny_hf(tmp_path / "hf", "qwen2")
    assert main(["quantize", str(src), "--method", "rtn", "--bits", "4", "--no-symmetric", "--out", str(tmp_path / "d")]) == 0
    d = tmp_path / "d"
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq", "lm_head": False}
    assert json.loads((d / "config.json").read_text()) == {**json.loads((src / "config.json").read_text()),
                                                           "quantization_config": quant}
    kept = [f.name for f in src.iterdir() if f.name.startswith(("tokenizer", "generation_config", "special_tokens"))]
    assert "tokenizer.json" in kept and all((d / f).read_bytes() == (src / f).read_bytes() for f in kept)
    lm = load_model(src)
    comp = quantize_model(lm, "rtn", gptq_grid(4, False, 32), None)
    t = load_file(str(d / "model.safetensors"))
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    off, size = qkv.shard_offsets["k"]
    assert np.array_equal(t["model.layers.0.self_attn.k_proj.bias"], qkv.bias[off : off + size].numpy())
    back = load_model(d)
    assert replace(back.config, name=lm.config.name) == lm.config and len(comp.parts) == 8  # (name: the directory's)
    assert all(torch.equal(a, back.model.state_dict()[k]) for k, a in lm.model.state_dict().items())
    capsys.readouterr()
    assert main(["quantize", str(d), "--method", "rtn", "--bits", "8", "--out", str(tmp_path / "d8")]) == 0
    assert "source d: GPTQ 4-bit asymmetric, groups of 32 linears dequantized to float32" in capsys.readouterr().err
    assert json.loads((tmp_path / "d8" / "config.json").read_text())["quantization_config"]["bits"] == 8


def _generate(path, quantization):
    llm = LLM(str(path), max_model_len=64, max_num_seqs=2, quantization=quantization)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    try:
        return llm.engine.lm, [o.outputs[0].token_ids for o in llm.generate(["hello world", [5, 9, 41, 7]], params)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("fmt,bits", [("q4_0", "4"), ("q8_0", "8")])
def test_the_directory_loads_to_the_gguf_of_the_same_grid(tiny_gguf, tmp_path, fmt, bits):
    calib = tmp_path / "c.txt"
    calib.write_text(split_text()[0])
    common = ["quantize", str(tiny_gguf), "--method", "gptq", "--calib-file", str(calib), "--calib-tokens", "512"]
    assert main([*common, "--format", fmt, "--out", str(tmp_path / "q.gguf")]) == 0
    assert main([*common, "--bits", bits, "--symmetric", "--group-size", "32", "--out", str(tmp_path / "d")]) == 0
    g, d = load_model(tmp_path / "q.gguf"), load_model(tmp_path / "d")
    assert g.model.state_dict().keys() == d.model.state_dict().keys()
    assert all(torch.equal(a, d.model.state_dict()[k]) for k, a in g.model.state_dict().items())
    assert g.tokenizer.encode("hello world") == d.tokenizer.encode("hello world")
    assert g.tokenizer.eos_token_ids == d.tokenizer.eos_token_ids and g.tokenizer.bos_token_id == d.tokenizer.bos_token_id
    for q in ("none", "auto"):  # dequantized, and (where the kernels are) on the same native codes
        lg, tg = _generate(tmp_path / "q.gguf", q)
        ld, td = _generate(tmp_path / "d", q)
        assert tg == td and all(len(t) == 10 for t in tg)
        assert ld.quantization == lg.quantization == ("gguf" if q == "auto" and native.available() else "none")
    if native.available():
        qkv_g, qkv_d = (lm.model.model.layers[0].self_attn.qkv_proj.qweight for lm in (lg, ld))
        x = torch.randn(3, qkv_g.in_features)
        assert type(qkv_g) is type(qkv_d) and torch.equal(qkv_g.matmul(x), qkv_d.matmul(x))


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
@pytest.mark.parametrize("sym", [True, False])
def test_auto_runs_4_bit_groups_of_32_natively_on_the_written_codes(tiny_gguf, tmp_path, sym):
    from kvserve.quant.int4 import Int4Weight

    lm, out = quantized(tiny_gguf, tmp_path, 4, sym, 32)
    n = load_model(out, quantization="auto")
    assert n.quantization == "gguf"
    for name in ("self_attn.qkv_proj", "mlp.down_proj"):
        lin, ref = (m.model.model.layers[1].get_submodule(name) for m in (n, lm))
        assert isinstance(lin.qweight, Int4Weight) and torch.equal(lin.qweight.dequantize(), ref.weight)


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
@pytest.mark.parametrize("bits,sym,group", [(8, True, 16), (3, True, 32), (2, False, 16)])
def test_auto_runs_other_widths_on_the_wide_kernel(tiny_gguf, tmp_path, bits, sym, group):
    """8-bit codes as they are, 3- and 2-bit ones as the 5-bit kernel's: the products match the float
    weights' up to the kernels' int8 activations."""
    from kvserve.quant.wide import WideWeight

    lm, out = quantized(tiny_gguf, tmp_path, bits, sym, group)
    n = load_model(out, quantization="auto")
    assert n.quantization == "gguf"
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    lin, ref = (m.model.model.layers[0].mlp.down_proj for m in (n, lm))
    assert isinstance(lin.qweight, WideWeight) and lin.qweight.bits == (8 if bits == 8 else 5)
    y, y_ref = lin.qweight.matmul(x), x @ ref.weight.t()
    assert float((y - y_ref).abs().max()) < 0.02 * float(y_ref.abs().max())


@pytest.mark.skipif(not native.available(), reason="no native CPU kernels here")
def test_auto_says_what_it_dequantized(tiny_gguf, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kvserve"):
        _, out16 = quantized(tiny_gguf, tmp_path / "g16", 4, True, 16)
        assert load_model(out16, quantization="auto").quantization == "none"
        _, asym8 = quantized(tiny_gguf, tmp_path / "asym8", 8, False, 32)
        assert load_model(asym8, quantization="auto").quantization == "none"
    text = caplog.text
    assert "auto -> none: GPTQ 4-bit symmetric, groups of 16: the native kernels take groups of whole 32s" in text
    assert "auto -> none: GPTQ 8-bit asymmetric, groups of 32: 14 of 14 linears" in text and "not fp16 values" in text
    assert "14 linears, 14 dequantized to float" in text


def _rewrite(out, config=None, tensors=None):
    from safetensors.torch import load_file as load_pt
    from safetensors.torch import save_file

    if config:
        c = json.loads((out / "config.json").read_text())
        c["quantization_config"].update(config)
        (out / "config.json").write_text(json.dumps(c))
    if tensors:
        t = load_pt(str(out / "model.safetensors"))
        t.update(tensors)
        save_file(t, str(out / "model.safetensors"))


@pytest.mark.parametrize("change,msg", [
    ({"tensors": {"model.layers.0.mlp.down_proj.g_idx": torch.arange(96, dtype=torch.int32).flip(0) // 32}},
     "g_idx reorders the inputs"),
    ({"config": {"checkpoint_format": "gptq_v2"}}, "classic 'gptq'"),
    ({"config": {"quant_method": "awq"}}, "GPTQ checkpoints (quant_method 'gptq') only"),
    ({"config": {"bits": 5}}, "GPTQ bits 5"),
])
def test_the_loader_refuses_what_it_cannot_read_exactly(tiny_gguf, tmp_path, change, msg):
    _, out = quantized(tiny_gguf, tmp_path, 4, True, 32)
    _rewrite(out, **change)
    with pytest.raises(ModelLoadError, match=re.escape(msg)):
        load_model(out)


@pytest.mark.parametrize("argv,msg", [
    (["--bits", "5"], "--bits 5: choose from 8, 4, 3, 2"),
    (["--bits", "5", "--out-format", "gguf"], "--bits 5: choose from 8, 4, 3, 2"),
    (["--group-size", "0"], "--group-size must be a positive number"),
    (["--group-size", "64", "--out-format", "gguf"], "GGUF q4_0 has groups of 32 inputs, not --group-size 64"),
    (["--group-size", "64"], "--group-size 64 does not divide mlp.down_proj's 96 inputs"),
    (["--bits", "3", "--group-size", "16"], None),
    (["--format", "q4_1"], "GGUF q4_1's grid has a float minimum per group"),
    (["--format", "q3_k"], "the GPTQ layout cannot hold it exactly; write a .gguf"),
    (["--format", "q8_0", "--bits", "4"], "--format q8_0 is symmetric 8-bit"),
])
def test_cli_errors_are_one_line(capsys, tiny_gguf, tmp_path, argv, msg):
    capsys.readouterr()
    out = tmp_path / "x.gguf" if "gguf" in argv else tmp_path / "dir"
    code = main(["quantize", str(tiny_gguf), "--method", "rtn", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    if msg is None:  # (3 bits in groups of 16 fits the tiny model: the control)
        assert code == 0 and (out / "model.safetensors").exists()
        return
    assert code == 2 and err.startswith("kvserve: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert msg in err, err


def test_cli_output_names(capsys, tiny_gguf, tmp_path):
    capsys.readouterr()
    for out, msg in ((tmp_path / "m.safetensors", "name the directory"), (tmp_path / "x.gguf", "not a .gguf file")):
        argv = ["quantize", str(tiny_gguf), "--method", "rtn", "--out", str(out), "--out-format", "safetensors"]
        assert main(argv) == 2 and msg in capsys.readouterr().err
    assert main(["quantize", str(tiny_gguf), "--method", "rtn", "--out", str(tmp_path / "d"), "--bits", "8"]) == 0
    printed = capsys.readouterr().out
    assert "rtn -> GPTQ 8-bit symmetric, groups of 32: 8 linears" in printed and f"wrote {tmp_path / 'd'}" in printed
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "quantize_config.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert main(["quantize", str(tiny_gguf), "--method", "rtn", "--out", str(tmp_path / "d"), "--bits", "4"]) == 0
    (tmp_path / "d" / "model.safetensors.index.json").write_text("{}")  # another model's, read as this one's
    assert main(["quantize", str(tiny_gguf), "--method", "rtn", "--out", str(tmp_path / "d")]) == 2
    assert "holding other files (model.safetensors.index.json)" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_directory_generates_as_its_q4_0_gguf(default_path, tmp_path):
    """The real model (about 15 s): RTN 4-bit symmetric groups of 32 as a directory and as a Q4_0 GGUF."""
    for out in ("d", "q.gguf"):
        assert main(["quantize", str(default_path), "--method", "rtn", "--bits", "4", "--symmetric",
                     "--out", str(tmp_path / out)]) == 0
    ld, td = _generate(tmp_path / "d", "auto")
    lg, tg = _generate(tmp_path / "q.gguf", "auto")
    assert td == tg and all(len(t) == 10 for t in td)
    assert ld.quantization == lg.quantization == ("gguf" if native.available() else "none")
    text = "The capital of France is Paris. <|im_start|>user\nhi<|im_end|>"
    assert ld.tokenizer.encode(text) == lg.tokenizer.encode(text)
    assert ld.tokenizer.chat_template == lg.tokenizer.chat_template and ld.tokenizer.eos_token_ids == lg.tokenizer.eos_token_ids
    from transformers import AutoTokenizer  # the directory's tokenizer files as transformers reads them

    tok, msgs = AutoTokenizer.from_pretrained(tmp_path / "d"), [{"role": "user", "content": "hi"}]
    assert tok(text)["input_ids"] == lg.tokenizer.encode(text)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == lg.tokenizer.apply_chat_template(msgs)


def test_transformers_reads_the_config_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    lm, out = quantized(tiny_gguf, tmp_path, 3, False, 32)
    c = AutoConfig.from_pretrained(out)
    assert type(c).__name__ == "LlamaConfig" and c.quantization_config["bits"] == 3 and c.num_key_value_heads == 2
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == lm.tokenizer.encode("hello world")
