"""guidellm and lm-eval, unmodified, against a live `kvserve serve` on a tiny GGUF. Neither reaches a hub:
their tokenizer is a directory written here from the GGUF's own tokenizer metadata (kvserve's loader), and
the hub / datasets / transformers offline switches are set for both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from helpers import write_tiny_llama_gguf
from serve_helpers import TinyServer

# guidellm 0.8.1 defines a pydantic-settings class the v1 way; its import warns about guidellm, not kvserve
pytestmark = pytest.mark.filterwarnings("ignore:Support for class-based `config` is deprecated")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def write_tokenizer_dir(gguf: Path, out: Path) -> Path:
    """A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) built by kvserve's loader
    from the GGUF's tokenizer.ggml.* metadata: what a client that tokenizes locally must share with the server."""
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(gguf))
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128,
        **tok.special_tokens, "chat_template": tok.chat_template}))
    return out


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-clients")
    gguf = write_tiny_llama_gguf(tiny_dir, root / "tiny.gguf", chat_template=TEMPLATE)
    tok_dir = write_tokenizer_dir(gguf, root / "tokenizer")
    s = TinyServer(gguf, "--served-model-name", "tiny")
    yield s, tok_dir
    s.stop()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub, datasets and transformers offline switches, here and in any worker a client spawns; the hub's
    is also read once at import, so it is patched there too. The client runs in tmp_path (guidellm writes there)."""
    import huggingface_hub.constants

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


def tokenize(url: str, **body) -> list[int]:
    r = httpx.post(f"{url}/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.slow
def test_guidellm_default_streaming(served, tmp_path, offline):
    """guidellm's default backend (streaming chat completions with vLLM's continuous usage stats, ignore_eos):
    4 requests, all successful, and its token counts are the server's."""
    server, tok_dir = served
    before = server.stats()
    out = tmp_path / "benchmarks.json"
    args = ["run",
           "--backend", f"kind=openai_http,target={server.url}",
           "--profile", "kind=synchronous",
           "--constraint", "kind=max_requests,count=4",
           "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
           "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
           "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    from guidellm.__main__ import cli  # its console script, run in this process (torch is imported already)

    cli.main(args, prog_name="guidellm", standalone_mode=False)

    (bench,) = json.loads(out.read_text())["benchmarks"]
    reqs = bench["requests"]
    assert (len(reqs["successful"]), reqs["errored"], reqs["incomplete"]) == (4, [], [])
    after = server.wait_idle()
    prompt_total = output_total = 0
    for req in reqs["successful"]:
        body = json.loads(req["request_args"])["body"]
        assert body["stream"] is True and body["stream_options"]["continuous_usage_stats"] is True
        assert req["response_id"].startswith("chatcmpl-")
        (part,) = body["messages"][0]["content"]  # a prompt of 16 tokens by the directory written from the GGUF
        assert len(tokenize(server.url, prompt=part["text"], add_special_tokens=False)) == 16
        assert req["info"]["timings"]["token_iterations"] > 1  # streamed, not one final chunk
        n_in, n_out = req["input_metrics"]["text_tokens"], req["output_metrics"]["text_tokens"]
        # what the server's template and tokenizer make of the messages guidellm sent
        assert n_in == len(tokenize(server.url, messages=body["messages"]))
        assert n_out == body["max_completion_tokens"] == 8  # ignore_eos honoured
        prompt_total += n_in
        output_total += n_out
    assert after["kvserve:prompt_tokens_total"] - before["kvserve:prompt_tokens_total"] == prompt_total
    assert after["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == output_total


ROWS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Fire is", "choices": ["cold", "hot", "wet"], "answer": 1},
    {"question": "A cat says", "choices": ["woof", "meow"], "answer": 1},
    {"question": "Ice is made of", "choices": ["water", "sand", "glass"], "answer": 0},
]


def test_lm_eval_local_completions_loglikelihoods(served, tmp_path, offline):
    """lm-eval's local-completions model on a 5-row multiple-choice task: each choice's loglikelihood is
    the one the server's echo + logprobs give for the same tokens, and its accuracy follows from them."""
    server, tok_dir = served
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "kvserve_tiny_mc.yaml").write_text(
        "task: kvserve_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf-datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")

    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "tiny", "base_url": f"{server.url}/v1/completions", "tokenizer": str(tok_dir),
                    "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
        tasks=["kvserve_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4, log_samples=True, bootstrap_iters=0)

    samples = sorted(res["samples"]["kvserve_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ROWS)
    correct = []
    for row, sample in zip(ROWS, samples):
        ctx = tokenize(server.url, prompt=row["question"], add_special_tokens=False)
        want = []
        for choice in row["choices"]:
            cont = tokenize(server.url, prompt=" " + choice, add_special_tokens=False)
            r = httpx.post(f"{server.url}/v1/completions", json={
                "model": "tiny", "prompt": ctx + cont, "max_tokens": 0, "echo": True, "logprobs": 1})
            assert r.status_code == 200, r.text
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert len(lps) == len(ctx) + len(cont)
            want.append(sum(lps[len(ctx):]))
        got = [ll for ll, _greedy in sample["filtered_resps"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        correct.append(max(range(len(want)), key=want.__getitem__) == row["answer"])
    acc = res["results"]["kvserve_tiny_mc"]["acc,none"]
    assert math.isclose(acc, sum(correct) / len(ROWS))
