"""Tiny random-weight checkpoints of every supported architecture against transformers."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_VOCAB, make_tiny_hf, random_ids, run_prefill
from kvserve.executor.reference import greedy_generate
from kvserve.loader import load_model

ARCHS = {
    "llama": {},
    "llama3_rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                    "tie_word_embeddings": True},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gpt2": {},
}


def _hf_logits(path, seq):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(torch.tensor([seq])).logits[0]


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    name = request.param
    arch = "llama" if name.startswith("llama") else name
    path = make_tiny_hf(tmp_path_factory.mktemp(name), arch, **ARCHS[name])
    return name, path


def test_logits_match_transformers(tiny):
    name, path = tiny
    lm = load_model(path)
    seqs = [random_ids(n, TINY_VOCAB, seed=n) for n in (1, 7, 40)]
    ours = run_prefill(lm.model, seqs)  # all three in one flat batch
    for seq, got in zip(seqs, ours):
        _, ref = _hf_logits(path, seq)
        scale = ref.abs().max().item()
        assert scale > 0.1, "degenerate random model"
        assert (got - ref).abs().max().item() < 1e-4 * max(1.0, scale), name


def test_paged_decode_matches_transformers_greedy(tiny):
    name, path = tiny
    lm = load_model(path)
    prompts = [random_ids(n, TINY_VOCAB, seed=100 + n) for n in (3, 17)]
    ours = greedy_generate(lm.model, prompts, max_new_tokens=12, block_size=4)
    hf, _ = _hf_logits(path, prompts[0])
    for p, got in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0)[0, len(p):].tolist()
        assert got == ref, name


def test_tied_embedding_shares_storage(tmp_path):
    lm = load_model(make_tiny_hf(tmp_path / "t", "llama", tie_word_embeddings=True))
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


def test_sharded_safetensors_index(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_hf(tmp_path / "m", "qwen2")
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname))
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    seq = random_ids(9, TINY_VOCAB, seed=1)
    got = run_prefill(load_model(path).model, [seq])[0]
    _, ref = _hf_logits(path, seq)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_load_and_stay_close(tmp_path, dtype):
    path = make_tiny_hf(tmp_path / "m", "llama")
    seq = random_ids(12, TINY_VOCAB, seed=3)
    ref = run_prefill(load_model(path).model, [seq])[0]
    lm = load_model(path, dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in lm.model.parameters())
    got = run_prefill(lm.model, [seq])[0].float()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
