"""Jump-forward decoding of structured outputs: the tokens a grammar forces are appended without a step
of their own. On the native path (forced tokens computed as one-token rows) the tokens are exactly those
of decoding without it, greedy and seeded; steps are fewer; requests with logprobs do not jump."""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers import make_tiny_hf, run_engine
from helpers_schemas import SCHEMAS
from kvserve import SamplingParams, StructuredOutputsParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.kernels import cpu as native
from kvserve.loader import load_model


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny-jf"), "llama")


@pytest.fixture(scope="module", params=["native", "torch"])
def loaded(request, tiny_paths):
    if request.param == "native" and not native.available():
        pytest.skip("no native CPU kernels here")
    return request.param, load_model(tiny_paths, quantization="int8" if request.param == "native" else "none")


def _run(loaded, params, jump: bool) -> tuple[list[list[int]], int, LLMEngine]:
    eng = LLMEngine(loaded=loaded, kv_cache_memory="8MiB", structured_outputs_jump_forward=jump)
    steps = [0]
    eng.step_observers.append(lambda so, dt: steps.__setitem__(0, steps[0] + 1))
    prompts = [[5 + i, 9, 17, 3 + i] for i in range(len(params))]
    return run_engine(eng, prompts, params, check_invariants=True), steps[0], eng


def test_jump_forward_keeps_tokens_and_saves_steps(loaded):
    path, model = loaded
    schemas = [s for _, s in SCHEMAS[:12]]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, seed=i, max_tokens=200,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(schemas)]
    want, steps_off, _ = _run(model, params, jump=False)
    got, steps_on, eng = _run(model, params, jump=True)
    assert eng.scheduler.jump_forward and steps_on < steps_off * 0.8, (steps_on, steps_off)
    tok = model.tokenizer
    complete = [(toks, schema) for toks, schema in zip(got, schemas) if len(toks) < 200]  # the rest hit max_tokens
    assert len(complete) >= len(schemas) // 2
    for toks, schema in complete:  # stopped by the grammar: a whole, valid document
        jsonschema.validate(json.loads(tok.decode(toks)), schema)
    if path == "native":  # each forced token's logits are computed as its own decode row would: the same tokens
        assert got == want


def test_requests_with_logprobs_do_not_jump(loaded):
    _, model = loaded
    params = [SamplingParams(temperature=0, max_tokens=60, logprobs=1,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[0][1]))]
    eng = LLMEngine(loaded=model, kv_cache_memory="8MiB")
    eng.add_request("a", [5, 9, 17], params[0])
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                c = o.outputs[0]
                assert len(c.logprobs) == len(c.token_ids) > 3
