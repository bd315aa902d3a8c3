"""What a user gets with no flags: quantization chosen (and said) by the checkpoint, a KV cache whose
resident memory follows its use rather than its budget."""

from __future__ import annotations

import logging

from helpers import make_tiny_hf, write_tiny_llama_gguf
from kvserve import SamplingParams
from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.kernels import cpu as native


def test_auto_is_the_default_and_says_what_it_chose(tmp_path, caplog):
    assert EngineConfig().quantization == "auto"
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    with caplog.at_level(logging.INFO, logger="kvserve.loader"):
        float_engine = LLMEngine(model=str(hf), kv_cache_memory="1MiB")
    assert float_engine.lm.quantization == "none"
    assert "quantization auto -> none: a float checkpoint stays float" in caplog.text
    caplog.clear()
    gguf = write_tiny_llama_gguf(hf, tmp_path / "tiny-q8.gguf", qtype="Q8_0")
    with caplog.at_level(logging.INFO, logger="kvserve.loader"):
        q_engine = LLMEngine(model=str(gguf), kv_cache_memory="1MiB")
    if native.available():
        from kvserve.quant.wide import WideWeight

        assert q_engine.lm.quantization == "gguf"
        assert f"quantization auto -> gguf: each layer in the file's own format, {native.isa()} kernels" in caplog.text
        down = q_engine.lm.model.model.layers[0].mlp.down_proj.qweight
        assert isinstance(down, WideWeight) and down.bits == 8  # Q8_0 runs as Q8_0
    else:
        assert q_engine.lm.quantization == "none" and "no native CPU kernels here" in caplog.text


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_kv_cache_memory_is_committed_as_blocks_are_used(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    before = _rss_mib()
    eng = LLMEngine(model=str(hf), kv_cache_memory="1GiB", enable_prefix_caching=False)
    assert eng.budget.kv_cache > 0.99 * 2**30
    after_start = _rss_mib()
    assert after_start - before < 200  # a 1 GiB budget, almost none of it resident
    eng.add_request("a", list(range(1, 200)), SamplingParams(max_tokens=8, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    # the blocks handed out first are the lowest ids: a short request touches the start of each layer's cache
    assert _rss_mib() - before < 250


def test_a_written_kv_block_commits_its_own_pages_not_a_huge_page():
    """Each layer's K and V is a lazily committed mapping: writing a block must commit about that block,
    not the 2 MiB huge page around it (with transparent huge pages, numpy's large arrays get them where
    the kernel allows: a cache of 60 tensors once held ~220 MiB of pages for 154 MiB of blocks written)."""
    import torch

    from kvserve.layers.attention.kv_cache import lazy_zeros

    before = _rss_mib()
    caches = [lazy_zeros((16384, 16, 3, 64), torch.float16) for _ in range(4)]  # 96 MiB each
    assert _rss_mib() - before < 4  # nothing written yet
    written = range(0, 16384, 400)  # 41 blocks of 6 KiB, 2.3 MiB apart
    for c in caches:
        for b in written:
            c[b].fill_(1.0)
    grown = _rss_mib() - before
    assert grown < 16, grown  # 164 blocks: about 1.3 MiB of pages; huge pages would commit 328 MiB
    assert all(float(c[b, 15, 2, 63]) == 1.0 and float(c[b + 1].abs().sum()) == 0 for c in caches for b in written)
