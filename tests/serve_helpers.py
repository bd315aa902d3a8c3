"""A live `kvserve serve` process on a tiny random-weight model: fast enough for many requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

# Python for TinyServer(pre=...): every engine step takes 20 ms longer, so requests queue and last
SLOW_STEP = """
import time
from kvserve.engine.llm_engine import LLMEngine
_step = LLMEngine.step
def _slow(self):
    time.sleep(0.02)
    return _step(self)
LLMEngine.step = _slow
"""

TINY_ARGS = ("--max-model-len", "128", "--kv-cache-memory", "2MiB", "--max-num-seqs", "32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Drain:
    """Reads a process's output as it comes: a pipe nobody reads fills at 64 KiB, and then the writer waits."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._run, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:  # noqa: ANN001
        for line in stream:
            self.lines.append(line)

    def text(self, timeout: float = 10) -> str:
        self.thread.join(timeout)
        return "".join(self.lines)


_drains: dict[int, _Drain] = {}


def drain(proc: subprocess.Popen) -> subprocess.Popen:
    """Keep reading `proc`'s stdout from now on (wait_healthy and stop_server then use what was read)."""
    _drains[proc.pid] = _Drain(proc)
    return proc


def _output(proc: subprocess.Popen) -> str:
    d = _drains.pop(proc.pid, None)
    return d.text() if d is not None else proc.stdout.read()


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Poll `url`/health until 200; raise with the server's output if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {_output(proc)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM (if still running), then the exit code and everything the server printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    if proc.pid not in _drains:
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return proc.returncode, out
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, _output(proc)


class TinyServer:
    """`kvserve serve` on the tiny model; `pre` is Python run in the server process before the CLI (faults);
    `read_output=False` leaves its output unread until stop() (a pipe that fills up)."""

    def __init__(self, model_dir, *extra: str, pre: str = "", env: dict | None = None, wait: bool = True,
                 read_output: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = f"import sys\n{pre}\nfrom kvserve.entrypoints.cli import main\nsys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--model", str(model_dir), "--port", str(self.port),
             *TINY_ARGS, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "KVSERVE_API_KEY": "", **(env or {})})
        if read_output:
            drain(self.proc)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_healthy(self.proc, self.url, timeout)

    def stats(self) -> dict[str, float]:
        """The engine gauges from /metrics (refreshed by the engine thread while idle)."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", headers=self.headers).text.splitlines():
            if line.startswith("kvserve:") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 10) -> dict[str, float]:
        """The gauges once nothing runs, waits or holds a KV block (or at `timeout`); snapshots lag a step."""
        deadline = time.time() + timeout
        while True:
            st = self.stats()
            idle = (st["kvserve:num_requests_running"] == 0 and st["kvserve:num_requests_waiting"] == 0
                    and st['kvserve:kv_cache_blocks{state="used"}'] == 0)
            if idle or time.time() > deadline:
                return st
            time.sleep(0.1)

    headers: dict = {}

    def stop(self) -> tuple[int, str]:
        return stop_server(self.proc)

    def output_tail(self, chars: int = 4000) -> str:
        """The last of what the running server printed (read_output=True)."""
        d = _drains.get(self.proc.pid)
        return "".join(d.lines)[-chars:] if d is not None else ""
