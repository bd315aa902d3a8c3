"""The embedded SmolLM2-135M (GGUF Q4_1) in float32 against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, run_prefill
from kvserve.executor.reference import greedy_generate

pytestmark = pytest.mark.slow

LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Numbers: 1, 2, 3, 5, 8, 13, 21,",
    "Ünïcode and emoji 😀 survive the trip through the model.",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]
GEN_PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the ocean:\n",
    "def quicksort(arr):",
    "The three primary colors are",
    "In 1969, the first humans",
    "Photosynthesis is the process by which",
    "A good way to learn a new language is",
    "Question: What is 12 times 12?\nAnswer:",
]


def test_logits_match_transformers_at_every_position(smollm, hf_smollm):
    seqs = [smollm.tokenizer.encode(p) for p in LOGIT_PROMPTS]
    ours = run_prefill(smollm.model, seqs)  # one flat batch, no padding
    for seq, got in zip(seqs, ours):
        with torch.no_grad():
            ref = hf_smollm(torch.tensor([seq])).logits[0]
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() < 1e-3 * scale


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_greedy_64_tokens_identical(smollm, hf_smollm, chat):
    tok = smollm.tokenizer
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in GEN_PROMPTS]
    else:
        prompts = [tok.encode(p) for p in GEN_PROMPTS]
    eos = tok.eos_token_ids
    ours = greedy_generate(smollm.model, prompts, 64, stop_ids=set(eos))
    produced = 0
    for ids, got, ref in zip(prompts, ours, hf_greedy(hf_smollm, prompts, 64, eos)):
        assert got == ref, tok.decode(ids)
        produced += len(got)
    assert produced >= 8 * 8  # the comparison covers real continuations, not instant EOS


def test_load_report(smollm):
    assert 134e6 < smollm.num_params < 135e6  # tied embedding counted once
    text = smollm.describe()
    assert "134.5M params" in text and "float32" in text and "MiB" in text
