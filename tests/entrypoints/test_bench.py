"""`kvserve bench serve` against a live tiny-model kvserve and against a stub OpenAI-compatible server
(fixed chunks, no /tokenize, no /stats); `bench throughput` / `bench latency` on the tiny model; bad flags."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from kvserve.entrypoints.cli import main
from conftest import STATS_KEY
from serve_helpers import free_port

STUB_CHUNKS = ["Hel", "lo", ",", " wor", "ld"]


def _stub_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[dict] = []

    async def generate(request: Request):
        body = await request.json()
        seen.append(body)
        chat = request.url.path.endswith("/chat/completions")

        async def events():
            for piece in STUB_CHUNKS:
                await asyncio.sleep(0.004)
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/completions", generate, methods=["POST"]),
                            Route("/v1/chat/completions", generate, methods=["POST"]),
                            Route("/v1/models", models)])
    return app, seen


@pytest.fixture(scope="module")
def stub():
    import uvicorn

    app, seen = _stub_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    t.join(5)


@pytest.fixture
def kvserve_server(stats_server):
    return stats_server


def _bench(tmp_path, capsys, *flags: str) -> tuple[dict, str]:
    rc = main(["bench", "serve", *flags, "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads((tmp_path / "r.json").read_text()), out


def _sane(res: dict, n: int) -> None:
    assert res["completed"] == n and res["failed"] == 0
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < res[f"median_{m}_ms"] <= res[f"p99_{m}_ms"], m
        assert res[f"mean_{m}_ms"] > 0
    assert all(0 < t <= e for t, e in zip(res["ttfts"], res["e2els"]))
    assert res["p99_ttft_ms"] <= res["p99_e2el_ms"]
    assert res["request_throughput"] > 0 and res["output_throughput"] > 0


def _pngs(d, names):
    for name in names:
        p = d / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, name


def test_bench_serve_against_a_stub(stub, tmp_path, capsys):
    url, seen = stub
    seen.clear()
    res, out = _bench(tmp_path, capsys, "--base-url", url, "--num-prompts", "12", "--random-input-len", "10",
                      "--random-output-len", "5", "--request-rate", "200", "--max-concurrency", "4",
                      "--goodput", "ttft:60000", "e2el:60000", "--plot", str(tmp_path / "plots"))
    _sane(res, 12)
    assert len(seen) == 12 and all(b["model"] == "stub-model" and b["max_tokens"] == 5 for b in seen)
    assert res["total_output_tokens"] == 12 * 5 and res["total_input_tokens"] == 12 * 7  # the usage reports
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # SLOs every request meets
    assert not res["stats_endpoint"] and "no /stats endpoint" in out
    assert "Serving Benchmark Result" in out and "Successful requests:" in out
    _pngs(tmp_path / "plots", ["ttft_cdf.png", "tpot_cdf.png"])
    assert not (tmp_path / "plots" / "kv_usage.png").exists()


def test_bench_serve_chat_against_the_stub(stub, tmp_path, capsys):
    url, seen = stub
    seen.clear()
    res, _ = _bench(tmp_path, capsys, "--base-url", url, "--endpoint", "/v1/chat/completions", "--num-prompts", "5",
                    "--random-input-len", "4", "--random-output-len", "5", "--goodput", "ttft:0.0001")
    _sane(res, 5)
    assert all(b["messages"][0]["role"] == "user" and b["max_completion_tokens"] == 5 for b in seen)
    assert res["request_goodput"] == 0  # nobody answers within 0.1 microseconds


def test_a_concurrency_sweep(stub, tmp_path, capsys):
    """--max-concurrency 1,4: one run (and one result table) per value, and the sweep plot."""
    url, seen = stub
    seen.clear()
    res, out = _bench(tmp_path, capsys, "--base-url", url, "--num-prompts", "8", "--random-input-len", "4",
                      "--random-output-len", "5", "--max-concurrency", "1,4", "--plot", str(tmp_path / "plots"))
    assert [r["max_concurrency"] for r in res["sweep"]] == [1, 4] and len(seen) == 16
    for r in res["sweep"]:
        _sane(r, 8)
    assert out.count("Serving Benchmark Result") == 2
    assert res["sweep"][1]["request_throughput"] > res["sweep"][0]["request_throughput"]  # 4 streams at once
    _pngs(tmp_path / "plots", ["ttft_cdf.png", "tpot_cdf.png", "sweep.png"])


@pytest.mark.slow
def test_bench_serve_against_kvserve(kvserve_server, tmp_path, capsys, monkeypatch):
    """Exact prompt lengths (random ids from the server's /tokenize), the counts /metrics has, and the KV
    timeline from /stats."""
    before = kvserve_server.wait_idle()
    dataset = tmp_path / "prompts.txt"
    res, out = _bench(tmp_path, capsys, "--base-url", kvserve_server.url, "--api-key", STATS_KEY, "--num-prompts", "12",
                      "--random-input-len", "16", "--random-output-len", "6", "--ignore-eos",
                      "--max-concurrency", "6", "--plot", str(tmp_path / "plots"))
    _sane(res, 12)
    assert res["input_lens"] == [16] * 12 and res["total_input_tokens"] == 12 * 16
    assert res["output_lens"] == [6] * 12
    st = kvserve_server.wait_idle()
    assert st['kvserve:request_success_total{finished_reason="length"}'] - \
        before.get('kvserve:request_success_total{finished_reason="length"}', 0) == 12
    assert st["kvserve:prompt_tokens_total"] - before["kvserve:prompt_tokens_total"] == 12 * 16
    assert st["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == 12 * 6
    assert res["stats_endpoint"] and res["kv_timeline"]
    assert max(s["running"] for s in res["kv_timeline"]) > 1
    assert res["server_roofline"]["weight_gb_per_s"] > 0  # the server's roofline line, printed after the table
    assert f"server {res['server_roofline']['line']} (its last 10 s)" in out
    _pngs(tmp_path / "plots", ["ttft_cdf.png", "tpot_cdf.png", "kv_usage.png"])
    # a file of prompts on the chat endpoint: lengths counted by /tokenize, then by the usage reports
    dataset.write_text("hello there\nwhat is a KV cache?\n\nwrite a poem\n")
    monkeypatch.setenv("OPENAI_API_KEY", STATS_KEY)  # the key as the openai client reads it
    res, _ = _bench(tmp_path, capsys, "--base-url", kvserve_server.url, "--endpoint", "/v1/chat/completions",
                    "--dataset-path", str(dataset), "--num-prompts", "4", "--random-output-len", "3", "--ignore-eos")
    assert res["completed"] == 4 and res["output_lens"] == [3] * 4
    assert all(n > 0 for n in res["input_lens"])


def test_bench_throughput_and_latency_offline(tiny_dir, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--max-model-len", "128", "--kv-cache-memory", "2MiB"]
    assert main(["bench", "throughput", *common, "--input-len", "12", "--output-len", "4", "--num-prompts", "6",
                 "--output-json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "Throughput:" in out and "requests/s" in out and "output tokens/s" in out and "GB/s of weights" in out
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["num_requests"] == 6 and t["total_input_tokens"] == 72 and t["total_output_tokens"] == 24
    assert t["requests_per_second"] > 0 and t["tokens_per_second"] > t["output_tokens_per_second"] > 0
    _pngs(tmp_path / "p", ["ttft_cdf.png", "tpot_cdf.png"])
    assert main(["bench", "latency", *common, "--input-len", "8", "--output-len", "4", "--batch-size", "2",
                 "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(tmp_path / "l.json")]) == 0
    out = capsys.readouterr().out
    assert "Avg latency:" in out and "99% percentile latency:" in out and "roofline: " in out
    lat = json.loads((tmp_path / "l.json").read_text())
    assert len(lat["latencies"]) == 3 and all(x > 0 for x in lat["latencies"])
    assert lat["percentiles"]["10"] <= lat["percentiles"]["50"] <= lat["percentiles"]["99"]


@pytest.mark.parametrize("flags, message", [
    (["serve", "--request-rate", "0"], "--request-rate must be > 0"),
    (["serve", "--request-rate", "fast"], "--request-rate must be a number or inf"),
    (["serve", "--goodput", "ttft"], "--goodput takes NAME:MILLISECONDS"),
    (["serve", "--goodput", "ttft:-3"], "must be > 0 ms"),
    (["serve", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["serve", "--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["serve", "--max-concurrency", "1,two"], "--max-concurrency takes a number or a list"),
    (["serve", "--metric-percentiles", "101"], "--metric-percentiles must lie in (0, 100]"),
    (["serve", "--endpoint", "v1/completions"], "--endpoint is a path"),
    (["serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"], "cannot reach http://127.0.0.1:9"),
    (["latency", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["throughput", "--input-len", "4", "--dataset-path", "x.txt"], "exclude each other"),
])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvserve: error: ") and message in err[0], err


def test_unknown_bench_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("module, flags, message", [
    ("httpx", ["serve", "--num-prompts", "1"], "kvserve bench serve needs httpx (pip install httpx"),
    ("matplotlib", ["serve", "--plot", "plots"], "--plot needs matplotlib (pip install matplotlib"),
    ("matplotlib", ["latency", "--plot", "plots"], "--plot needs matplotlib (pip install matplotlib"),
])
def test_a_missing_optional_dependency_is_one_line(module, flags, message, monkeypatch, capsys, tmp_path):
    import builtins

    real = builtins.__import__

    def without(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"no {module}")
        return real(name, *a, **k)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "__import__", without)
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvserve: error: " + message), err
    assert not (tmp_path / "plots").exists()  # refused before anything ran or was written
