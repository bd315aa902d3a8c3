from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ mirrors the package in subfolders; their shared fakes and builders live in tests/helpers.py
sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, torch.get_num_threads()))
# the thread count stays fixed in tests (the servers they start inherit this): runs compared bit for bit
# must not differ by a thread change that another process's load caused (tests/engine/test_cpu_threads.py
# tests the governor itself)
os.environ.setdefault("KVSERVE_CPU_THREAD_GOVERNOR", "0")


@pytest.fixture(scope="session")
def default_path():
    from kvserve.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm(default_path):
    """kvserve's float32 load of the embedded default model."""
    from kvserve.loader import load_model

    return load_model(default_path, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm(default_path):
    """transformers' own load of the same GGUF: the oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        default_path.parent, gguf_file=default_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm_ppl(smollm):
    """The float32 default model's perplexity at ctx 512 on helpers.ppl_text(), computed once for the tests
    that compare with it (transformers, the paged caches, the quantized formats)."""
    from kvserve.eval.perplexity import perplexity
    from helpers import CTX, ppl_text

    return perplexity(smollm, ppl_text(), ctx=CTX)
