"""Soak test of `kvserve serve`: a long run at ~80% of measured capacity, with misbehaving clients.

Starts a server (the default model, or with --tiny a tiny random Llama), measures its capacity
(requests/s of the same mixed workload at --max-num-seqs concurrency, over the last two thirds of
--capacity-seconds),
then sends Poisson arrivals at --load x capacity for --minutes: mixed prompt and output lengths
(streamed, ignore_eos), --disconnect-frac of the clients going away at a random point (while
queued, or after a random number of events), --bad-frac bad requests (malformed JSON, an
out-of-range field, an out-of-vocabulary token id: each must be a 400). Prints the server's RSS
every minute, errors by kind, p50/p99 end-to-end latency per --window-minutes window, and, after
the load stops and the server is idle, the KV blocks still in use (kvserve:kv_cache_blocks
{state="used"} from /metrics: cached prefix blocks are not "used"). One JSON line last.

Exit status 1 if any server error was seen (a 5xx other than a deliberate 503 of
--limit-concurrency, a 429 is deliberate too; an error event in a stream other than a 408 of
--request-timeout; a dropped connection),
a KV block leaked, or the server died; else 0.

    python benchmarks/soak.py                      # default model, 30 minutes
    python benchmarks/soak.py --tiny --minutes 2   # a quick run on a tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port  # noqa: E402  (benchmarks/serve.py)

OOV_TOKEN = 99199426  # the token id of the reproduction (#19)


def rss_mib(pid: int) -> float | None:
    """VmRSS of the server process and its children (parallel workers), MiB."""
    total, found = 0.0, False
    pids = [pid]
    try:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(d.name))
                except (OSError, ValueError, IndexError):
                    pass
        for p in pids:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                    found = True
    except OSError:
        return None
    return round(total, 1) if found else None


def gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("kvserve:") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, max_model_len: int) -> None:
        self.args, self.url = args, url
        self.rng = random.Random(args.seed)
        self.kinds: Counter[str] = Counter()  # outcome kinds
        self.server_errors: list[str] = []  # a few examples
        self.n_server_errors = 0
        self.lat: list[tuple[float, float]] = []  # (finish time, e2e seconds) of complete generations
        # mixed lengths: short chats, medium, long prompts; short to long outputs (all inside max_model_len)
        cap = max_model_len
        self.prompt_lens = [(4, 32), (32, min(128, cap // 4)), (min(128, cap // 4), max(cap // 2, 40))]
        self.output_lens = [8, 32, min(128, cap // 4)]

    def body(self) -> dict:
        lo, hi = self.rng.choice(self.prompt_lens)
        n = self.rng.randint(lo, max(lo, hi))
        return {"prompt": [self.rng.randrange(3, 300) for _ in range(n)], "max_tokens": self.rng.choice(self.output_lens),
                "temperature": self.rng.choice([0.0, 0.8]), "ignore_eos": True, "stream": True}

    def server_error(self, kind: str, detail: str) -> None:
        self.kinds[kind] += 1
        self.n_server_errors += 1
        if len(self.server_errors) < 10:
            self.server_errors.append(f"{kind}: {detail[:200]}")

    async def generation(self, c: httpx.AsyncClient, disconnect: bool) -> bool:
        """One streamed completion; True when it completed (not left, not refused, no error)."""
        body = self.body()
        # a client that goes away: while queued / before its first event (after a short delay), or mid-stream
        # after a random number of events (possibly all of them, before [DONE])
        leave_after = self.rng.randint(0, body["max_tokens"]) if disconnect else None
        t0 = time.perf_counter()
        events, error = 0, None
        try:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.status(r, "generation")
                    return False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:  # an event a line-by-line reader cannot parse: the server's fault
                        self.server_error("bad_sse_event", data[:200])
                        return False
                    if "error" in chunk:
                        error = chunk["error"]
                        break
                    events += 1
                    if leave_after is not None and events >= leave_after:
                        self.kinds["disconnected_mid_stream"] += 1
                        return False  # leaving the block closes the connection
        except httpx.HTTPError as e:
            self.server_error("transport_error", repr(e))
            return False
        if error is not None and error.get("code") == "request_timeout":
            self.kinds["timed_out_408"] += 1  # --request-timeout, if the server was given one: deliberate
        elif error is not None:
            self.server_error("stream_error_event", json.dumps(error))
        elif leave_after is not None:
            self.kinds["disconnected_after_last_token"] += 1
        else:
            self.kinds["ok"] += 1
            self.lat.append((time.time(), time.perf_counter() - t0))
            return True
        return False

    async def queued_disconnect(self, c: httpx.AsyncClient) -> None:
        task = asyncio.ensure_future(self.generation(c, disconnect=False))
        await asyncio.sleep(self.rng.uniform(0.0, 0.05))
        if task.done():
            return
        task.cancel()  # the connection closes before (or just as) the first event arrives
        try:
            await task
        except asyncio.CancelledError:
            self.kinds["disconnected_early"] += 1

    async def bad(self, c: httpx.AsyncClient) -> None:
        kind = self.rng.choice(["malformed_json", "out_of_range", "unknown_token_id"])
        try:
            if kind == "malformed_json":
                r = await c.post("/v1/completions", content=b'{"prompt": [1, 2,', headers={"content-type": "application/json"})
            elif kind == "out_of_range":
                field = self.rng.choice([{"max_tokens": -5}, {"temperature": -1}, {"n": 10**6}, {"top_p": 7},
                                         {"logprobs": 10**4}])
                r = await c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, **field})
                kind += "_" + next(iter(field))
            else:
                r = await c.post("/v1/completions", json={"prompt": [5, OOV_TOKEN], "max_tokens": 4, "stream": True})
        except httpx.HTTPError as e:
            self.server_error("transport_error", repr(e))
            return
        if r.status_code == 400 and "error" in r.json():
            self.kinds[f"bad_{kind}_400"] += 1
        else:
            self.status(r, f"bad_{kind}")

    def status(self, r: httpx.Response, what: str) -> None:
        """An answer other than 200 (generation) or 400 (bad request)."""
        try:
            code = r.json().get("error", {}).get("code")
        except ValueError:
            code = None
        if r.status_code == 429 or (r.status_code == 503 and code == "server_overloaded"):
            self.kinds[f"refused_{r.status_code}"] += 1  # deliberate: overload refused politely
        elif r.status_code >= 500:
            self.server_error(f"{what}_{r.status_code}", r.text)
        else:
            self.kinds[f"{what}_{r.status_code}"] += 1
            if len(self.server_errors) < 10:  # not a server error, but unexpected: show it
                self.server_errors.append(f"unexpected {what} {r.status_code}: {r.text[:200]}")

    async def capacity(self, c: httpx.AsyncClient, seconds: float, concurrency: int) -> float:
        """Complete generations per second with `concurrency` clients in a closed loop, over the last two
        thirds of `seconds` (the first third warms the server up: first-call set-up, allocator).

        Each generation counts for the share of its duration inside the window, the last ones waited for.
        Counting the generations that end inside it instead favours the short ones of a mixed workload (a
        long one straddles an edge more often): with 20 s of default-model requests that read 1.2 req/s
        where the soak's mix completed 0.7, and the soak's queue grew without end."""
        done = 0.0
        t0 = time.perf_counter()
        start, stop = t0 + seconds / 3, t0 + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                began = time.perf_counter()
                ok = await self.generation(c, disconnect=False)
                ended = time.perf_counter()
                if ok and ended > began:
                    done += max(0.0, min(ended, stop) - max(began, start)) / (ended - began)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        rate = done / (stop - start)
        if self.n_server_errors:
            print(f"server errors while measuring capacity: {self.server_errors}", flush=True)
        else:
            self.kinds.clear()  # the soak's tallies start afresh (server errors stay counted)
            self.lat.clear()
        return rate

    async def run(self, rate: float, seconds: float, pid: int) -> list[dict]:
        """Poisson arrivals at `rate` for `seconds`; RSS printed every --rss-every seconds."""
        a = self.args
        tasks: set[asyncio.Task] = set()
        rss: list[dict] = []
        t0 = time.time()
        end = t0 + seconds
        next_rss = t0

        async with httpx.AsyncClient(base_url=self.url, timeout=a.request_timeout,
                                     limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as c:
            while True:
                now = time.time()
                if now >= next_rss:
                    m = rss_mib(pid)
                    rss.append({"minute": round((now - t0) / 60, 2), "rss_mib": m})
                    print(f"[{(now - t0) / 60:5.1f} min] rss {m} MiB, in flight {len(tasks)}, "
                          f"outcomes {dict(sorted(self.kinds.items()))}", flush=True)
                    next_rss += a.rss_every
                if now >= end:
                    break
                u = self.rng.random()
                if u < a.bad_frac:
                    coro = self.bad(c)
                elif u < a.bad_frac + a.disconnect_frac:
                    coro = self.queued_disconnect(c) if self.rng.random() < 0.3 else self.generation(c, True)
                else:
                    coro = self.generation(c, False)
                t = asyncio.ensure_future(coro)
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                await asyncio.sleep(min(self.rng.expovariate(rate), max(0.0, end - time.time())))
            print(f"load stopped; waiting for {len(tasks)} requests in flight", flush=True)
            if tasks:
                await asyncio.wait(tasks, timeout=a.request_timeout)
        m = rss_mib(pid)
        rss.append({"minute": round((time.time() - t0) / 60, 2), "rss_mib": m})
        return rss

    def windows(self, t0: float, width_s: float) -> list[dict]:
        out = []
        n = max(1, int(np.ceil((max((t for t, _ in self.lat), default=t0) - t0) / width_s)))
        for i in range(n):
            xs = [e for t, e in self.lat if t0 + i * width_s <= t < t0 + (i + 1) * width_s]
            out.append({"from_min": round(i * width_s / 60, 1), "n": len(xs), "p50_s": pct(xs, 50),
                        "p99_s": pct(xs, 99)})
        return out


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--disable-log-requests"]
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import make_tiny_hf

        path = make_tiny_hf(Path(tempfile.mkdtemp(prefix="kvserve-soak-")), "llama")
        cmd += ["--model", str(path), "--max-model-len", str(args.max_model_len or 256), "--kv-cache-memory", "4MiB"]
    else:
        if args.model:
            cmd += ["--model", args.model]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
    cmd += args.server_arg
    log = Path(tempfile.mkstemp(prefix="kvserve-soak-", suffix=".log")[1])
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the default model")
    ap.add_argument("--model", default=None)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the measured capacity")
    ap.add_argument("--capacity-seconds", type=float, default=None, help="capacity measurement (default 90 s, tiny 12 s)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: 256 with --tiny, else the model's")
    ap.add_argument("--disconnect-frac", type=float, default=0.05)
    ap.add_argument("--bad-frac", type=float, default=0.02)
    ap.add_argument("--window-minutes", type=float, default=5.0)
    ap.add_argument("--rss-every", type=float, default=60.0, help="seconds between RSS lines")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="client-side timeout per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `kvserve serve` argument (repeatable)")
    args = ap.parse_args()

    proc, url, log = start_server(args)
    try:
        mml = int(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0].get("max_model_len") or
                  args.max_model_len or 256)
        soak = Soak(args, url, mml)
        cap_s = args.capacity_seconds or (12.0 if args.tiny else 90.0)

        async def measure() -> float:
            async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as c:
                return await soak.capacity(c, cap_s, args.max_num_seqs)

        capacity = asyncio.run(measure())
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s at {args.max_num_seqs} in flight (max_model_len {mml}); "
              f"soaking {args.minutes:g} min at {rate:.2f} req/s", flush=True)
        t0 = time.time()
        rss = asyncio.run(soak.run(rate, args.minutes * 60, proc.pid))
        windows = soak.windows(t0, args.window_minutes * 60)
        # the load has stopped: the server must come back to nothing running, nothing waiting, no block in use
        used, healthy = None, False
        try:
            deadline = time.time() + 30
            while True:
                g = gauges(url)
                idle = g["kvserve:num_requests_running"] == 0 and g["kvserve:num_requests_waiting"] == 0
                if (idle and g['kvserve:kv_cache_blocks{state="used"}'] == 0) or time.time() > deadline:
                    break
                time.sleep(0.5)
            used = int(g['kvserve:kv_cache_blocks{state="used"}'])
            healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
        except httpx.HTTPError as e:  # the server died or stopped answering: reported below, exit 1
            print(f"after the load the server did not answer: {e!r}", flush=True)
    finally:
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None

    n_server = soak.n_server_errors
    print("outcomes:", json.dumps(dict(sorted(soak.kinds.items()))))
    for e in soak.server_errors:
        print("  ", e)
    for w in windows:
        print(f"window from {w['from_min']:5.1f} min: {w['n']:5d} complete, p50 {w['p50_s']} s, p99 {w['p99_s']} s")
    vals = [r["rss_mib"] for r in rss if r["rss_mib"] is not None]
    after_warmup = vals[1:] or vals
    drift = round(100 * (max(after_warmup) - min(after_warmup)) / min(after_warmup), 1) if after_warmup else None
    print(f"KV blocks in use after the load: {used}; RSS {vals[0] if vals else None} -> "
          f"{vals[-1] if vals else None} MiB (spread after the first minute {drift}%); "
          f"server {'healthy' if healthy else 'NOT healthy'}, exit code {rc}")
    passed = n_server == 0 and used == 0 and healthy and alive and rc == 0  # used None: unknown, a failure
    if not passed:
        print(f"server log: {log}")
    print(json.dumps({"benchmark": "soak", "tiny": args.tiny, "minutes": args.minutes,
                      "capacity_rps": round(capacity, 3), "target_rps": round(rate, 3),
                      "requests": sum(soak.kinds.values()), "outcomes": dict(sorted(soak.kinds.items())),
                      "server_errors": n_server, "kv_blocks_used_after": used, "rss_mib": rss,
                      "rss_spread_after_warmup_pct": drift, "latency_windows": windows, "server_exit_code": rc,
                      "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
