"""Serving load generator for any OpenAI-compatible server, plus kvserve's offline baseline.

Sends `--num-requests` streaming /v1/completions requests with token-id prompts of exact
length, `ignore_eos`, either at a fixed concurrency or with Poisson arrivals (`--request-rate`).
Reports request and output-token throughput and TTFT / TPOT / ITL / end-to-end latency
(mean, p50, p90, p99). With `--launch` it starts `kvserve serve` itself, and (unless
`--no-offline`) runs the same workload through the offline `LLM.generate` afterwards, in the
same run, for the server/offline ratio. Prints one JSON line last.

    python benchmarks/serve.py --launch                       # kvserve server + offline baseline
    python benchmarks/serve.py --base-url http://host:8080    # any other OpenAI-compatible server
    python benchmarks/serve.py --vs-llamacpp                  # llama.cpp's server, then kvserve's, same run

With --vs-llamacpp (needs `pip install -e .[bench]`) both servers get the same text prompts (real
English, tokenized identically by both) and `min_tokens = max_tokens` so neither stops early;
their output tok/s, TTFT and peak RSS are printed side by side with the kvserve/llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.array(xs)
    return {"mean": round(float(a.mean()), 4), "p50": round(float(np.percentile(a, 50)), 4),
            "p90": round(float(np.percentile(a, 90)), 4), "p99": round(float(np.percentile(a, 99)), 4)}


def workload(n: int, in_len: int, out_len: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 49000, size=in_len).tolist(), out_len) for _ in range(n)]


def text_workload(n: int, in_len: int, out_len: int, model: str | None) -> list[tuple[str, int]]:
    """Prompts of about in_len tokens cut from English prose (the Python reference manual)."""
    from pydoc_data.topics import topics

    from kvserve.loader import default_model_path
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(model or default_model_path()))
    ids = tok.encode("\n\n".join(topics.values()))
    return [(tok.decode(ids[i * 211 : i * 211 + in_len]), out_len) for i in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: list[int] | str,
                      max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    stamps: list[float] = []
    n_out = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("choices") and d["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                if d.get("usage"):
                    n_out = d["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - t0, "e2e": end - t0, "n_out": n_out or len(stamps),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


async def run_load(url: str, model: str | None, reqs, concurrency: int, rate: float | None, seed: int) -> dict:
    limits = httpx.Limits(max_connections=max(concurrency, 1) * 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, model, reqs[0][0][:16], 4)  # warm-up
        sem = asyncio.Semaphore(concurrency)
        rnd = random.Random(seed)

        async def guarded(p, n):
            async with sem:
                return await one_request(client, url, model, p, n)

        t0 = time.perf_counter()
        tasks = []
        for p, n in reqs:
            tasks.append(asyncio.ensure_future(guarded(p, n)))
            if rate:
                await asyncio.sleep(rnd.expovariate(rate))
        results = await asyncio.gather(*tasks)
        dur = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    n_out = sum(r["n_out"] for r in ok)
    return {
        "duration_s": round(dur, 2), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [r["error"] for r in results if "error" in r][:3],
        "request_throughput": round(len(ok) / dur, 3), "output_tok_s": round(n_out / dur, 2),
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "tpot_s": percentiles([(r["e2e"] - r["ttft"]) / (r["n_out"] - 1) for r in ok if r["n_out"] > 1]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(port)]
    if not getattr(args, "defaults", False):  # --defaults: kvserve serve as installed, no flags
        cmd += ["--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory,
                "--max-num-seqs", str(max(args.concurrency, 1))]
    if getattr(args, "kv_cache_dtype", None):
        cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.threads:
        cmd += ["--num-threads", str(args.threads)]
    if args.quantization:
        cmd += ["--quantization", args.quantization]
    if args.model:
        cmd += ["--model", args.model]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)


LLAMA_N_CTX = 4096  # llama.cpp server's KV room in tokens (f16 K/V); kvserve gets the same in float16


def launch_llamacpp(args) -> tuple[subprocess.Popen, str]:
    from kvserve.loader import default_model_path

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model or str(default_model_path()),
           "--port", str(port), "--n_threads", str(args.threads or 2), "--n_threads_batch", str(args.threads or 2),
           "--interrupt_requests", "False"]
    if not getattr(args, "defaults", False):
        cmd += ["--n_ctx", str(LLAMA_N_CTX), "--n_batch", "512"]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env=llamacpp_env(args)), port)


def llamacpp_env(args) -> dict[str, str]:
    """The environment of a llama.cpp process: --llamacpp-path puts another build of llama-cpp-python
    first (e.g. one compiled for AVX2 only, to compare with kvserve's AVX2 kernels on an AVX-512 CPU)."""
    env = dict(os.environ)
    if getattr(args, "llamacpp_path", None):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.llamacpp_path, env.get("PYTHONPATH")) if p)
    return env


def peak_rss_mib(proc: subprocess.Popen) -> float | None:
    """VmHWM of a running process (Linux)."""
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_ready(proc: subprocess.Popen, port: int) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def offline(args, reqs) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.concurrency)
    llm.generate([reqs[0][0][:16]], SamplingParams(max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                                for _, n in reqs], use_tqdm=False)
    dur = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": round(dur, 2), "output_tok_s": round(n_out / dur, 2),
            "ttft_s": percentiles([o.metrics.ttft for o in outs])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--launch", action="store_true", help="start `kvserve serve` for the run")
    ap.add_argument("--model", default=None)
    ap.add_argument("--served-model", default=None, help="model name to send (default: none)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--vs-llamacpp", action="store_true", help="run llama.cpp's server, then kvserve's")
    ap.add_argument("--threads", type=int, default=None, help="threads for the launched servers")
    ap.add_argument("--quantization", default=None, help="kvserve serve --quantization (default: its own, auto)")
    ap.add_argument("--llamacpp-path", default=None,
                    help="a directory holding another llama-cpp-python build (pip install --target DIR ...)")
    ap.add_argument("--defaults", action="store_true",
                    help="--vs-llamacpp: both servers at their defaults (no KV room, dtype or batch flags)")
    args = ap.parse_args()
    if args.vs_llamacpp:
        compare_llamacpp(args)
        return
    reqs = workload(args.num_requests, args.input_len, args.output_len, args.seed)
    result: dict = {"workload": f"{args.num_requests} req x ({args.input_len} in + {args.output_len} out), "
                                f"concurrency {args.concurrency}, rate {args.request_rate or 'max'}, {args.dtype}"}
    proc = None
    if args.launch:
        proc, url = launch(args)
    elif args.base_url:
        url = args.base_url.rstrip("/")
    else:
        raise SystemExit("give --launch or --base-url")
    try:
        result["server"] = asyncio.run(run_load(url, args.served_model, reqs, args.concurrency, args.request_rate,
                                                args.seed))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print("server:", result["server"], flush=True)
    if args.launch and not args.no_offline:
        result["offline"] = offline(args, reqs)
        print("offline:", result["offline"], flush=True)
        result["server_vs_offline"] = round(result["server"]["output_tok_s"] / result["offline"]["output_tok_s"], 3)
    print(json.dumps(result))


def compare_llamacpp(args) -> None:
    reqs = text_workload(args.num_requests, args.input_len, args.output_len, args.model)
    room = "both at their defaults" if args.defaults else f"KV room {LLAMA_N_CTX} tokens of 16-bit K/V each"
    res: dict = {"workload": f"{args.num_requests} text prompts of ~{args.input_len} tokens + {args.output_len} out, "
                             f"concurrency {args.concurrency}, threads {args.threads or 2}, {room}"}
    for name, start in (("llamacpp", launch_llamacpp), ("kvserve", launch)):
        if name == "kvserve" and not args.defaults:
            args.threads = args.threads or 2
            # the same KV room as llama.cpp's server: LLAMA_N_CTX tokens of 16-bit K/V
            import torch

            from kvserve.layers.attention import KVCache
            from kvserve.loader import default_model_path
            from kvserve.loader.gguf import GGUFFile

            cfg = GGUFFile(args.model or default_model_path()).model_config()
            per_token = cfg.num_layers * KVCache.bytes_per_token(cfg.num_kv_heads, cfg.head_dim, torch.float16)
            args.kv_cache_dtype = "float16"
            args.kv_cache_memory = str(LLAMA_N_CTX * per_token)
        if name == "kvserve":
            args.threads = args.threads or 2
        proc, url = start(args)
        try:
            r = asyncio.run(run_load(url, args.served_model, reqs, args.concurrency, args.request_rate, args.seed))
            r["peak_rss_mib"] = peak_rss_mib(proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        res[name] = r
        print(f"{name}: {r}", flush=True)
    a, b = res["kvserve"], res["llamacpp"]
    res["ratio"] = {"output_tok_s": a["output_tok_s"] / b["output_tok_s"],
                    "ttft_p50": a["ttft_s"]["p50"] / b["ttft_s"]["p50"],
                    "ttft_p99": a["ttft_s"]["p99"] / b["ttft_s"]["p99"],
                    "peak_rss": (a["peak_rss_mib"] or 0) / (b["peak_rss_mib"] or 1)}
    print(f"{'':16s}{'kvserve':>10s}{'llama.cpp':>11s}{'ratio':>8s}")
    for label, x, y in (("output tok/s", a["output_tok_s"], b["output_tok_s"]),
                        ("TTFT p50 s", a["ttft_s"]["p50"], b["ttft_s"]["p50"]),
                        ("TTFT p99 s", a["ttft_s"]["p99"], b["ttft_s"]["p99"]),
                        ("peak RSS MiB", a["peak_rss_mib"] or 0, b["peak_rss_mib"] or 0)):
        print(f"{label:16s}{x:10.2f}{y:11.2f}{x / y if y else float('nan'):8.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
