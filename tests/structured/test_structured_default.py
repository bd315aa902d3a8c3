"""Structured outputs on the real default model: asked in words, answered under the schema, every answer valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from helpers_schemas import SCHEMAS
from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_path):
    """The default model as it serves: its GGUF weights on the native CPU path."""
    return LLM(loaded=load_model(default_path), kv_cache_memory="128MiB")


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def test_schema_suite_greedy_all_valid(llm):
    prompts = [_chat(llm, f"Give me {what} as JSON.") for what, _ in SCHEMAS]
    params = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=schema))
              for _, schema in SCHEMAS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (what, schema), o in zip(SCHEMAS, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (what, c.text)
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_and_choice_on_real_prompts(llm):
    asks = [("What is 12 times 12? Answer with the number only.", StructuredOutputsParams(regex=r"[0-9]{1,4}")),
            ("Is the sky blue? Answer yes or no.", StructuredOutputsParams(choice=["yes", "no"])),
            ("Write today's date.", StructuredOutputsParams(regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"))]
    outs = llm.generate([_chat(llm, q) for q, _ in asks],
                        [SamplingParams(temperature=0, max_tokens=16, structured_outputs=s) for _, s in asks],
                        use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[0-9]{1,4}", texts[0]) and texts[1] in ("yes", "no")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", texts[2])
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
