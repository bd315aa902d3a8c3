"""The engine on the real default model: 64 mixed prompts batched == alone == transformers (greedy, float32)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import hf_greedy, run_engine
from kvserve import SamplingParams
from kvserve.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow
NEW_TOKENS = 12

WORDS = ("the cat sat on a mat while rain fell over old town streets and children laughed at "
         "a small dog chasing leaves in the cold autumn wind near river banks").split()


def _prompts(tok) -> list[list[int]]:
    rng = np.random.default_rng(42)
    out = []
    for i in range(64):
        n = int(rng.integers(1, 48))
        text = " ".join(rng.choice(WORDS, size=n)).capitalize()
        ids = tok.encode(text)
        out.append(ids if i % 4 else tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True))
    return out


def _run(engine: LLMEngine, prompts, params) -> list[list[int]]:
    return run_engine(engine, prompts, params)


@pytest.fixture(scope="module")
def workload(smollm, hf_smollm):
    prompts = _prompts(smollm.tokenizer)
    return prompts, hf_greedy(hf_smollm, prompts, NEW_TOKENS)


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_64_prompts_batched_equal_transformers(smollm, workload):
    prompts, refs = workload
    eng = LLMEngine(loaded=smollm, kv_cache_memory="512MiB")
    assert _run(eng, prompts, GREEDY) == refs
    alone = [_run(eng, [p], GREEDY)[0] for p in prompts[:6]]
    assert alone == refs[:6]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prompts_chunked_and_preempted(smollm, workload, mode):
    """32 of the prompts (a run of 16-token steps over 30 blocks of 4 tokens: most of the test's time is
    steps, so half the prompts halve it) still preempt, and swap, many times."""
    prompts, refs = workload[0][:32], workload[1][:32]
    m = smollm.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    eng = LLMEngine(loaded=smollm, kv_cache_memory=30 * per_block, block_size=4, max_num_batched_tokens=16,
                    preemption_mode=mode, swap_space=20 * per_block)
    assert _run(eng, prompts, GREEDY) == refs
    print(f"{mode}: preemptions {eng.scheduler.num_preemptions}, swaps {eng.scheduler.num_swaps}")
    assert eng.scheduler.num_preemptions > 0
    assert (eng.scheduler.num_swaps > 0) == (mode == "swap")
    assert eng.kv.pool.num_used_blocks == 0


@pytest.fixture(scope="module", params=["int8", "int4"])
def smollm_quantized(request, default_path):
    from kvserve.kernels import cpu as native
    from kvserve.loader import load_model

    if not native.available():
        pytest.skip("native kernels unavailable here")
    lm = load_model(default_path, quantization=request.param)
    assert lm.quantization == request.param
    return lm


ALONE = 32  # prompts of the 64 also run alone (every fourth a chat prompt, as in the batch)


def test_quantized_weights_batched_equal_alone(smollm_quantized, workload):
    """The quantized default model: 64 prompts batched vs each alone, and chunked vs whole prefill;
    and its greedy continuations mostly agree with the float model's.

    The int8/int4 GEMMs and the decode attention are exact per row, and the fused decode step is
    batch-invariant, but the prefill's float ops (torch's rms_norm reductions, SDPA) are not
    bit-invariant across batch shapes, and int8 activation rounding can amplify a last-bit
    difference into another token: so agreement, not identity.
    """
    prompts, refs = workload
    eng = LLMEngine(loaded=smollm_quantized, kv_cache_memory="512MiB", max_num_batched_tokens=8192)
    batched = _run(eng, prompts, GREEDY)
    alone = [_run(eng, [p], GREEDY)[0] for p in prompts[:ALONE]]  # each alone: a run per prompt, the cost
    same = sum(a == b for a, b in zip(batched, alone))
    print(f"{smollm_quantized.quantization}: {same}/{ALONE} batched == alone")
    assert same >= ALONE - ALONE // 8, f"only {same}/{ALONE} batched continuations equal the ones run alone"
    chunked = LLMEngine(loaded=smollm_quantized, kv_cache_memory="512MiB", max_num_batched_tokens=16)
    same = sum(a == b for a, b in zip(_run(chunked, prompts, GREEDY), batched))
    print(f"{smollm_quantized.quantization}: {same}/64 chunked == whole")
    assert same >= 40, f"only {same}/64 chunked continuations equal the unchunked ones"  # 50 measured
    same_first = sum(a[0] == b[0] for a, b in zip(batched, refs))
    assert same_first >= 56, f"only {same_first}/64 first tokens equal the float model's"
