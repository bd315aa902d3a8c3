"""GGUF loading: layout (q/k permutation), block formats, tokenizer metadata, damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from helpers import TINY_VOCAB, make_tiny_hf, random_ids, run_prefill, write_tiny_llama_gguf
from kvserve.errors import ModelLoadError, UnsupportedModelError
from kvserve.loader import load_model
from kvserve.loader.gguf import GGUFFile
from kvserve.quant.gguf import dequantize_torch


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("llama"), "llama", num_key_value_heads=2)


def test_f32_gguf_matches_hf_dir_exactly(tiny_llama, tmp_path):
    """The converter's q/k row permutation must be undone, or logits would differ wildly."""
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / "m.gguf")
    seq = random_ids(20, TINY_VOCAB, seed=5)
    from_gguf = run_prefill(load_model(path).model, [seq])[0]
    from_hf = run_prefill(load_model(tiny_llama).model, [seq])[0]
    assert torch.equal(from_gguf, from_hf)


def test_gguf_tokenizer_matches_hf_tokenizer(tiny_llama, tmp_path):
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / "m.gguf")
    a, b = load_model(path).tokenizer, load_model(tiny_llama).tokenizer
    text = "the thin man ran in 2024 </s> ünïcode"
    assert a.encode(text, add_special_tokens=False) == b.encode(text, add_special_tokens=False)
    assert a.encode(text, add_special_tokens=False).count(a.eos_token_id) == 1  # "</s>" is one special token
    plain = "the thin man ran in 2024, ünïcode"
    assert a.decode(a.encode(plain)) == plain
    assert a.encode(plain)[0] == a.bos_token_id == b.encode(plain)[0]  # both files ask for BOS


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_loads_dequantized(tiny_llama, tmp_path, qtype):
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    gf = GGUFFile(path)
    name = "blk.0.ffn_up.weight"
    assert gf.tensor_type(name) == qtype
    t = gf.tensors[name]
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(gf.dequantize(name).numpy(), ref.reshape(gf.dequantize(name).shape))
    seq = random_ids(16, TINY_VOCAB, seed=7)
    got = run_prefill(load_model(path).model, [seq])[0]
    exact = run_prefill(load_model(tiny_llama).model, [seq])[0]
    err = (got - exact).abs().max().item() / exact.abs().max().item()
    assert err < (0.05 if qtype.startswith("Q8") else 0.3)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_torch_block_decoder_equals_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
    got = dequantize_torch(q, qtype, (8, 256))
    assert np.array_equal(got.numpy(), ref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_other_types_decode_through_gguf(tiny_llama, tmp_path, qtype):
    """K-quants have no encoder in gguf-py: store random blocks and check the decode path and shapes."""
    gtype = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[gtype]
    shape = (4, 256)
    rng = np.random.default_rng(1)
    if qtype in ("F16", "BF16"):
        arr = rng.normal(size=shape).astype(np.float32)
        raw = gguf.quants.quantize(arr, gtype)
    else:
        raw = rng.integers(0, 256, size=(shape[0], shape[1] // block * nbytes), dtype=np.uint8)
        raw[:, :2] = 0  # keep the block scale (an f16) finite
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / "m.gguf", extra_tensors={"extra.weight": (raw, gtype)})
    gf = GGUFFile(path)
    got = gf.dequantize("extra.weight")
    assert tuple(got.shape) == shape
    ref = gguf.quants.dequantize(gf.tensors["extra.weight"].data, gtype).reshape(shape)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_unsupported_tensor_type(tiny_llama, tmp_path):
    gtype = gguf.GGMLQuantizationType.IQ2_XXS
    block, nbytes = gguf.GGML_QUANT_SIZES[gtype]
    raw = np.zeros((2, 256 // block * nbytes), dtype=np.uint8)
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / "m.gguf", extra_tensors={"blk.0.attn_q.weight": (raw, gtype)})
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load_model(path)


def test_unsupported_architecture(tiny_llama, tmp_path):
    path = write_tiny_llama_gguf(tiny_llama, tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'"):
        load_model(path)


def test_truncated_and_corrupt_files(default_path, tmp_path):
    data = default_path.read_bytes()
    for cut in (3, 100, 2_000_000, len(data) - 1000):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(p)):
            load_model(p)
    bad = tmp_path / "bad-magic.gguf"
    bad.write_bytes(b"GGUX" + data[4:4096])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        load_model(garbage)


def test_own_reader_matches_the_gguf_package(default_path, tiny_llama, tmp_path):
    """kvserve's header parser against the gguf package's reader, on the default model and on a
    file of mixed tensor types: every metadata value, every tensor's type, offset, shape and bytes."""
    from kvserve.loader.gguf_reader import GGUFReader

    mixed = write_tiny_llama_gguf(tiny_llama, tmp_path / "mixed.gguf", qtype={"attn_v": "Q8_0", "ffn_down": "F16", "*": "Q4_1"})
    for path in (default_path, mixed):
        ours, theirs = GGUFReader(path), gguf.GGUFReader(path)
        want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert ours.fields == want
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (b.tensor_type, b.n_elements, b.n_bytes,
                                                                                b.data_offset)
            assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
            assert np.array_equal(a.data, np.asarray(b.data))
