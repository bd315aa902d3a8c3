"""N-gram speculation on the real default model: input-grounded prompts (the answer copies the prompt)
give identical greedy tokens with and without speculation, on the default native path and in float32."""

from __future__ import annotations

import pytest

from helpers import long_english_text, run_engine
from kvserve import SamplingParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.loader import load_model

pytestmark = pytest.mark.slow
# fixed draft lengths: the verify path runs on every draft the proposer finds (adaptive lengths: test_spec_adaptive.py)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1, "adaptive": False}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def default_native(default_path):
    """The default engine's own load (quantized GGUF, fused native decode where the CPU has it)."""
    return load_model(default_path)


def _prompts() -> list[str]:
    paras = [p for p in long_english_text().split("\n\n") if 250 < len(p) < 450][:2]
    return [f"{p}\n\nThe same paragraph, copied word for word:\n\n{p[:60]}" for p in paras]


def _run(eng: LLMEngine, prompts, params) -> list[list[int]]:
    return run_engine(eng, prompts, params, check_invariants=True)


@pytest.mark.parametrize("which", ["native", "float32"])
def test_copying_prompts_identical_and_mostly_accepted(request, which):
    loaded = request.getfixturevalue("default_native" if which == "native" else "smollm")
    prompts = _prompts()
    assert len(prompts) == 2
    # a seeded sampled request speculates too and keeps its tokens
    params = [GREEDY] * 2 + [SamplingParams(temperature=0.7, seed=1, max_tokens=20)]
    prompts = prompts + [prompts[0]]
    want = _run(LLMEngine(loaded=loaded, kv_cache_memory="64MiB"), prompts, params)
    eng = LLMEngine(loaded=loaded, kv_cache_memory="64MiB", speculative_config=NGRAM)
    got = _run(eng, prompts, params)
    assert got == want
    assert len(got[2]) == 20
    st = eng.stats()
    print(which, {k: v for k, v in st.items() if k.startswith("spec")})
    assert st["spec_decode_num_drafts"] > 10
    assert st["spec_decode_acceptance_rate"] > 0.25  # the answers copy the prompt


def test_self_quant_drafts_for_the_float32_model_with_its_greedy_tokens(smollm):
    """The float32 default model drafted for by its own GGUF in Q4_1 on the native path (self_quant): a
    chat answer and a raw-text continuation (where Q4_1 and float32 part ways), batched, greedy tokens
    identical to float32 decoding without speculation."""
    tok = smollm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], tokenize=True,
                                       add_generation_prompt=True), "Write a story about a cat who learns to fly."]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _run(LLMEngine(loaded=smollm, kv_cache_memory="64MiB"), prompts, params)
    spec = {"method": "self_quant", "num_speculative_tokens": 4, "adaptive": False}
    eng = LLMEngine(loaded=smollm, kv_cache_memory="64MiB", speculative_config=spec)
    assert eng.scheduler.proposer.lm.quantization == "gguf"
    got = _run(eng, prompts, params)
    assert got == want
    st = eng.stats()
    print({k: v for k, v in st.items() if k.startswith("spec")})
    assert 0.5 < st["spec_decode_acceptance_rate"] < 1.0
