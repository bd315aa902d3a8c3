"""The offline LLM API as vLLM users write it: prompt forms, `with LLM(...)`, shutdown, the main guard."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import make_tiny_hf
from kvserve import LLM, SamplingParams
from kvserve.distributed.executor import NO_MAIN_GUARD
from kvserve.entrypoints import llm as llm_module
from kvserve.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def llm(tiny_path):
    with LLM(str(tiny_path), kv_cache_memory="4MiB") as llm:
        yield llm


def _toks(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_vllm_prompt_forms_agree(llm):
    ids = llm.get_tokenizer().encode("the cat")
    (ref,) = _toks(llm.generate("the cat", GREEDY, use_tqdm=False))
    assert _toks(llm.generate(ids, GREEDY, use_tqdm=False)) == [ref]
    assert _toks(llm.generate({"prompt": "the cat"}, GREEDY, use_tqdm=False)) == [ref]
    assert _toks(llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)) == [ref]
    mixed = ["the cat", ids, {"prompt": "the cat"}, {"prompt_token_ids": ids}, [ids[0]]]
    outs = llm.generate(mixed, GREEDY, use_tqdm=False)
    assert _toks(outs)[:4] == [ref] * 4 and outs[4].prompt_token_ids == [ids[0]]
    assert outs[0].prompt == "the cat" and outs[3].prompt_token_ids == ids


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "x", "multi_modal_data": {}}, "multi_modal_data"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "one of"),
    ({}, "one of"),
    ([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": "12"}], "list of token ids"),
    ([{"prompt": [1, 2]}], "token ids go in"),
    ([[1, 2], [1.5]], "string or a list of token ids"),
])
def test_bad_prompt_forms_name_the_problem(llm, bad, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate(bad, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_one_and_many_conversations(llm):
    conv = [{"role": "user", "content": "hi"}]
    one = llm.chat(conv, GREEDY, use_tqdm=False)
    two = llm.chat([conv, [{"role": "user", "content": "bye"}]], GREEDY, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2 and _toks(two)[0] == _toks(one)[0]


def test_context_manager_and_shutdown(tiny_path):
    with LLM(str(tiny_path), kv_cache_memory="1MiB") as llm:
        assert llm.generate("hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine is None
    with pytest.raises(InvalidRequestError, match="shut down"):
        llm.generate("hi", GREEDY, use_tqdm=False)
    llm.shutdown()  # twice is fine


def test_progress_without_a_terminal_is_a_few_plain_lines(llm, capsys, monkeypatch):
    capsys.readouterr()
    llm.generate(["a b", "c d", "e f", "g h"], GREEDY)  # stderr is captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and "requests: 4/4 done" in err
    monkeypatch.setattr(llm_module, "PROGRESS_PERIOD_S", 0.0)  # a line per finished request, at most
    llm.generate(["a b", "c d", "e f"], GREEDY)
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 3 and lines[-1].startswith("requests: 3/3 done")


@pytest.mark.slow
def test_shutdown_stops_parallel_workers(tiny_path):
    llm = LLM(str(tiny_path), kv_cache_memory="1MiB", tensor_parallel_size=2)
    procs = [p for _, p in llm.engine.executor.procs]
    assert procs and all(p.is_alive() for p in procs)
    assert llm.generate("hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()
    assert not any(p.is_alive() for p in procs)


@pytest.mark.slow
def test_missing_main_guard_is_explained(tiny_path, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from kvserve import LLM
        llm = LLM({str(tiny_path)!r}, kv_cache_memory="1MiB", tensor_parallel_size=2)
        print("generated", llm.generate("hi", use_tqdm=False)[0].outputs[0].text)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "generated" not in r.stdout
    assert NO_MAIN_GUARD in r.stderr and '__name__ == "__main__"' in r.stderr
    assert "bootstrapping phase" not in r.stderr and r.stderr.count("Traceback") == 1  # the script's own, not a worker's
