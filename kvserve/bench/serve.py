"""`kvserve bench serve`: streaming load against any OpenAI-compatible server, vLLM's flags and result keys.

Requests arrive all at once (`--request-rate inf`) or as a Poisson process, at most `--max-concurrency`
in flight. Prompts are random token ids (`--random-input-len` exactly, drawn from the ids of a short
English text as the server's /tokenize or `--tokenizer` encodes it), or the lines of `--dataset-path`.
Chat endpoints get text; a prompt's length is then counted by the same tokenizer. Without either
tokenizer, prompts are random words and lengths come from the server's usage reports.
While the run lasts, the server's /stats is polled for the KV-cache timeline (`--plot`), when it has one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kvserve.bench import plot
from kvserve.bench.results import latency_rows, meets, parse_goodput, print_table, summarize_ms
from kvserve.errors import InvalidRequestError

# the token source for random prompts (any English will do: the ids are drawn from its tokenization)
SEED_TEXT = (
    "The quick brown fox jumps over the lazy dog while the engine schedules each request's tokens under a "
    "budget. Memory is divided into blocks, and every block holds the keys and values of a few positions. "
    "When a prompt shares its beginning with an earlier one, the cached blocks are reused instead of being "
    "computed again. Decoding reads every weight once per step, so batching many sequences together makes "
    "better use of the bandwidth. Latency, throughput and fairness pull in different directions; a good "
    "scheduler finds a balance that suits the workload at hand, from short questions to long documents."
)
STATS_POLL_S = 0.25


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int | None  # None: unknown until the server's usage report
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int | None = None
    output_len: int = 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load an OpenAI-compatible server and report TTFT/TPOT/ITL/e2e and throughput")
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name sent with each request (default: the server's first)")
    p.add_argument("--tokenizer", default=None,
                   help="a local model directory or GGUF whose tokenizer counts prompt tokens (default: the "
                        "server's /tokenize)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY or $KVSERVE_API_KEY)")
    p.add_argument("--dataset-name", choices=("random", "file"), default=None,
                   help="random token prompts, or the prompts of --dataset-path (default: file when it is given)")
    p.add_argument("--dataset-path", default=None,
                   help="prompts: a text file (one per line) or JSONL with \"prompt\" (and \"output_len\")")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), or inf")
    p.add_argument("--max-concurrency", default=None,
                   help="at most this many requests in flight; a list (1,2,4,8) runs a sweep, one run per value")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM's field): every output is full")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs a request must meet to count as good: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true", help="write the result as JSON")
    p.add_argument("--result-dir", default=None, help="directory for --save-result (default: the current one)")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write PNGs: TTFT and TPOT CDFs, and the KV-cache timeline from the server's /stats")
    p.add_argument("--disable-tqdm", action="store_true", help="accepted for vLLM compatibility (no bar is drawn)")
    p.set_defaults(bench_func=main)


def _httpx():  # noqa: ANN202 - the httpx module
    try:
        import httpx
    except ImportError:
        raise InvalidRequestError("kvserve bench serve needs httpx (pip install httpx, or kvserve[bench-serve])"
                                  ) from None
    return httpx


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise InvalidRequestError(f"--request-rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise InvalidRequestError(f"--request-rate must be > 0, got {text!r}")
    return rate


def _concurrencies(text: str | None) -> list[int | None]:
    """--max-concurrency: None (unlimited), one value, or a comma-separated sweep."""
    if text is None:
        return [None]
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"--max-concurrency takes a number or a list such as 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidRequestError(f"--max-concurrency must be >= 1, got {text!r}")
    return list(values)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidRequestError(f"--metric-percentiles takes numbers like 50,90,99, got {text!r}") from None
    if not ps or not all(0 < p <= 100 for p in ps):
        raise InvalidRequestError(f"--metric-percentiles must lie in (0, 100], got {text!r}")
    return ps


class Tokens:
    """Prompt tokens counted by a local tokenizer, else by the server's /tokenize, else not at all."""

    def __init__(self, client: Any, base_url: str, model: str | None, local: str | None) -> None:
        self.client, self.base_url, self.model = client, base_url, model
        self.local = _local_tokenizer(local) if local else None
        self.server = False
        if self.local is None:
            try:
                r = client.post(f"{base_url}/tokenize", json=self._body(prompt="hi"))
                self.server = r.status_code == 200 and isinstance(r.json().get("tokens"), list)
            except Exception:  # noqa: BLE001 - no /tokenize (or not JSON): lengths come from usage
                self.server = False

    @property
    def available(self) -> bool:
        return self.local is not None or self.server

    def _body(self, **kw: Any) -> dict:
        return {**({"model": self.model} if self.model else {}), **kw}

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.local is not None:
            return self.local.encode(text, add_special_tokens=special)
        r = self.client.post(f"{self.base_url}/tokenize", json=self._body(prompt=text, add_special_tokens=special))
        r.raise_for_status()
        return r.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        if self.local is not None:
            return self.local.decode(ids)
        r = self.client.post(f"{self.base_url}/detokenize", json=self._body(tokens=ids))
        r.raise_for_status()
        return r.json()["prompt"]


def _local_tokenizer(path: str):  # noqa: ANN202 - a kvserve Tokenizer
    from kvserve.loader.tokenizer import Tokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidRequestError(f"--tokenizer {path}: no such file or directory")
    if p.is_dir():
        from kvserve.loader.hf import HFModelDir

        return Tokenizer.from_hf_dir(p, HFModelDir(p).raw_config)
    from kvserve.loader.gguf import GGUFFile

    return Tokenizer.from_gguf(GGUFFile(p))


def build_requests(args: argparse.Namespace, tokens: Tokens, chat: bool) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    n = args.num_prompts
    dataset = args.dataset_name or ("file" if args.dataset_path else "random")
    if dataset == "file":
        if not args.dataset_path:
            raise InvalidRequestError("--dataset-name file needs --dataset-path")
        rows = _read_dataset(args.dataset_path, args.random_output_len)
        reqs = []
        for i in range(n):  # cycle through the file when it has fewer prompts than --num-prompts
            text, out_len = rows[i % len(rows)]
            reqs.append(BenchRequest(text, len(tokens.encode(text, not chat)) if tokens.available else None, out_len))
        return reqs
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise InvalidRequestError("--random-input-len and --random-output-len must be >= 1")
    if not tokens.available:  # random words; the server's usage reports count them
        words = SEED_TEXT.split()
        return [BenchRequest(" ".join(rng.choice(words) for _ in range(args.random_input_len)), None,
                             args.random_output_len) for _ in range(n)]
    pool = sorted(set(tokens.encode(SEED_TEXT, special=False)))
    reqs = []
    for _ in range(n):
        ids = [rng.choice(pool) for _ in range(args.random_input_len)]
        if chat:  # text for the chat template; its length as the tokenizer counts it
            text = tokens.decode(ids)
            reqs.append(BenchRequest(text, len(tokens.encode(text, special=False)), args.random_output_len))
        else:
            reqs.append(BenchRequest(ids, len(ids), args.random_output_len))
    return reqs


def _read_dataset(path: str, default_out: int) -> list[tuple[str, int]]:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"--dataset-path {path}: no such file")
    rows: list[tuple[str, int]] = []
    for i, line in enumerate(p.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                d = json.loads(line)
                rows.append((str(d["prompt"]), int(d.get("output_len", default_out))))
            except (ValueError, KeyError, TypeError):
                raise InvalidRequestError(f"{path}:{i}: not a JSON object with a \"prompt\"") from None
        else:
            rows.append((line, default_out))
    if not rows:
        raise InvalidRequestError(f"--dataset-path {path} holds no prompt")
    return rows


def _body(args: argparse.Namespace, model: str | None, req: BenchRequest, chat: bool) -> dict:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True},
                            "temperature": args.temperature}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def one_request(client: Any, url: str, body: dict, req: BenchRequest, chat: bool) -> RequestResult:
    httpx = _httpx()
    res = RequestResult(prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    last = t0
    chunks = 0
    usage_out = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                d = json.loads(data)
                choices = d.get("choices") or []
                text = ""
                if choices:
                    c = choices[0]
                    text = ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
                usage = d.get("usage")
                if usage:
                    usage_out = usage.get("completion_tokens", usage_out)
                    if usage.get("prompt_tokens") is not None and (chat or res.prompt_len is None):
                        res.prompt_len = usage["prompt_tokens"]  # chat: the template's tokens count too
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2el = time.perf_counter() - t0
    if chunks == 0:
        res.error = "the stream carried no output"
        return res
    res.output_len = usage_out if usage_out is not None else chunks
    res.success = True
    return res


async def poll_stats(client: Any, base_url: str, stop: asyncio.Event, out: dict) -> None:
    """Collect /stats step records until `stop`; out["available"] False when the server has no /stats."""
    seq = 0
    httpx = _httpx()
    while True:
        try:
            r = await client.get(f"{base_url}/stats", params={"since": seq})
            body = r.json() if r.status_code == 200 else None
            if not (isinstance(body, dict) and isinstance(body.get("steps"), list)):
                out["available"] = False
                return
        except (httpx.HTTPError, ValueError):
            out["available"] = False
            return
        out["available"] = True
        out["steps"].extend(body["steps"])
        out["roofline"] = body.get("roofline")  # the server's own: weights streamed against its peaks
        seq = body.get("last_seq", seq)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), STATS_POLL_S)
        except asyncio.TimeoutError:
            pass


async def run(args: argparse.Namespace, base_url: str, model: str | None, reqs: list[BenchRequest], headers: dict,
              rate: float, chat: bool, conc: int | None) -> tuple[list[RequestResult], float, float, dict]:
    httpx = _httpx()
    limits = httpx.Limits(max_connections=max(conc or len(reqs), 1) + 4, max_keepalive_connections=64)
    url = base_url + args.endpoint
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits, headers=headers) as client:
        sem = asyncio.Semaphore(conc) if conc else None

        async def limited(req: BenchRequest) -> RequestResult:
            body = _body(args, model, req, chat)
            if sem is None:
                return await one_request(client, url, body, req, chat)
            async with sem:
                return await one_request(client, url, body, req, chat)

        stop = asyncio.Event()
        stats: dict = {"available": None, "steps": []}
        poller = asyncio.ensure_future(poll_stats(client, base_url, stop, stats))
        t_wall, t0 = time.time(), time.perf_counter()
        tasks = []
        for i, req in enumerate(reqs):
            if i and rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.ensure_future(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        stop.set()
        await poller
    return list(results), duration, t_wall, stats


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float],
              percentiles: tuple[float, ...]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    tpots = [(r.e2el - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    in_lens = [r.prompt_len for r in ok]
    total_in = sum(x for x in in_lens if x is not None)
    total_out = sum(r.output_len for r in ok)
    good = sum(meets(slos, r.ttft, (r.e2el - r.ttft) / (r.output_len - 1) if r.output_len > 1 else None, r.e2el)
               for r in ok) if slos else None
    out: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "total_input_tokens": total_in, "input_lens_known": all(x is not None for x in in_lens),
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "request_goodput": None if good is None else good / duration, "goodput_slos_ms": slos or None,
    }
    out.update(summarize_ms("ttft", [r.ttft for r in ok], percentiles))
    out.update(summarize_ms("tpot", tpots, percentiles))
    out.update(summarize_ms("itl", [x for r in ok for x in r.itl], percentiles))
    out.update(summarize_ms("e2el", [r.e2el for r in ok], percentiles))
    out["input_lens"] = in_lens
    out["output_lens"] = [r.output_len for r in ok]
    out["ttfts"] = [r.ttft for r in ok]
    out["tpots"] = tpots
    out["e2els"] = [r.e2el for r in ok]
    return out


def main(args: argparse.Namespace, engine_kwargs: dict | None = None) -> int:
    """Run the benchmark (engine_kwargs: unused, the engine is the server's)."""
    httpx = _httpx()
    rate = _rate(args.request_rate)
    percentiles = _percentiles(args.metric_percentiles)
    slos = parse_goodput(args.goodput)
    sweep = _concurrencies(args.max_concurrency)
    if args.num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be >= 1")
    if not args.endpoint.startswith("/"):
        raise InvalidRequestError(f"--endpoint is a path such as /v1/completions, got {args.endpoint!r}")
    chat = "chat" in args.endpoint
    plot_dir = plot.check_available(args.plot)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("KVSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=30, headers=headers) as client:
        model = args.model
        try:
            if model is None:
                r = client.get(f"{base_url}/v1/models")
                if r.status_code == 200 and r.json().get("data"):
                    model = r.json()["data"][0]["id"]
        except httpx.HTTPError as e:
            raise InvalidRequestError(f"cannot reach {base_url}: {e}") from None
        except ValueError:
            pass
        tokens = Tokens(client, base_url, model, args.tokenizer)
        reqs = build_requests(args, tokens, chat)
    runs = []
    for conc in sweep:
        results, duration, t_wall, stats = asyncio.run(run(args, base_url, model, reqs, headers, rate, chat, conc))
        res = summarize(results, duration, slos, percentiles)
        res.update({"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "base_url": base_url,
                    "endpoint": args.endpoint, "model_id": model, "num_prompts": args.num_prompts,
                    "request_rate": rate, "max_concurrency": conc, "stats_endpoint": bool(stats["available"]),
                    "kv_timeline": [{"time": s["time"] - t_wall, "kv_cache_usage_perc": s["kv_cache_usage_perc"],
                                     "running": s["running"], "waiting": s["waiting"]} for s in stats["steps"]],
                    "server_roofline": stats.get("roofline")})
        _report(res, rate, slos, percentiles)
        runs.append((res, stats, t_wall))
    if plot_dir is not None:
        _plots(plot_dir, runs, args.num_prompts)
    if args.save_result:
        res = runs[-1][0] if len(runs) == 1 else {"sweep": [r for r, _, _ in runs], "date": runs[0][0]["date"]}
        qps = "inf" if rate == float("inf") else f"{rate:g}"
        name = args.result_filename or f"kvserve-{qps}qps-{(model or 'model').replace('/', '_')}-{res['date']}.json"
        d = Path(args.result_dir or ".")
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(res, indent=1))
        print(f"result: {d / name}")
    return 0 if all(r["completed"] for r, _, _ in runs) else 1


def _report(res: dict, rate: float, slos: dict, percentiles: tuple[float, ...]) -> None:
    conc = res["max_concurrency"]
    rows = [("Successful requests", res["completed"]), ("Failed requests", res["failed"]),
            ("Maximum request concurrency", conc or "unlimited"),
            ("Request rate (req/s)", "inf" if rate == float("inf") else rate),
            ("Benchmark duration (s)", res["duration"]), ("Total input tokens", res["total_input_tokens"]),
            ("Total generated tokens", res["total_output_tokens"]),
            ("Request throughput (req/s)", res["request_throughput"])]
    if slos:
        rows.append(("Request goodput (req/s)", res["request_goodput"]))
    rows += [("Output token throughput (tok/s)", res["output_throughput"]),
             ("Total token throughput (tok/s)", res["total_token_throughput"])]
    rows += latency_rows(res, (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                               ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")), percentiles)
    print_table("Serving Benchmark Result", rows)
    if res.get("server_roofline"):  # a kvserve server: its roofline over the last 10 s of the run
        print(f"server {res['server_roofline']['line']} (its last 10 s)")
    if res["failed"]:
        print(f"first errors: {res['errors']}")
    if not res["input_lens_known"]:
        print("note: the server reported no prompt_tokens for some requests and no tokenizer was available; "
              "total input tokens counts only the known ones")


def _plots(plot_dir: Path, runs: list[tuple[dict, dict, float]], num_prompts: int) -> None:
    """CDFs (one curve per run of a sweep), throughput and latency vs concurrency for a sweep, and the KV
    timeline of the last run (the highest concurrency of a sweep) when the server has /stats."""
    def label(res: dict) -> str:
        return f"max concurrency {res['max_concurrency'] or 'unlimited'}" if len(runs) > 1 else ""

    written = [plot.cdf(plot_dir / "ttft_cdf.png", {label(r): r["ttfts"] for r, _, _ in runs}, "TTFT (ms)",
                        "Time to first token"),
               plot.cdf(plot_dir / "tpot_cdf.png", {label(r): r["tpots"] for r, _, _ in runs}, "TPOT (ms)",
                        "Time per output token")]
    if len(runs) > 1:
        written.append(plot.sweep(plot_dir / "sweep.png", [r for r, _, _ in runs]))
    res, stats, t_wall = runs[-1]
    if stats["available"]:
        written.append(plot.kv_timeline(plot_dir / "kv_usage.png", stats["steps"], t_wall,
                                        f"KV cache during the run ({num_prompts} requests)"))
    else:
        print("plot: the server has no /stats endpoint; no KV-usage timeline")
    for w in written:
        if w is not None:
            print(f"plot: {w}")
