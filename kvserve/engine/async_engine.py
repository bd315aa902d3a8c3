"""AsyncLLMEngine: the engine's step loop on its own thread, an asyncio front for the server.

The engine is not thread-safe, so every mutation (add, abort, step) happens on the engine
thread; the event loop sends commands through a queue and receives outputs through per-request
asyncio queues. PyTorch releases the GIL inside its kernels, so HTTP handling keeps running
while a step computes, and a step never waits for a slow client.

Failure isolation: a command that fails (one request's add or abort) fails that request only and
the loop goes on; a future is completed at most once, never after its caller cancelled it. A step
that raises breaks an engine invariant: the loop stops, every open stream and queued add gets
EngineDeadError, and `error` is set (the server then answers 503 and exits, see cli.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from kvserve.config import ModelConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.outputs import RequestOutput
from kvserve.errors import InvalidRequestError, KVServeError
from kvserve.loader.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5


class EngineDeadError(KVServeError):
    """The engine loop stopped (crash or shutdown); maps to HTTP 503."""


class QueueFullError(KVServeError):
    """Too many requests waiting; maps to HTTP 429 (with Retry-After)."""


class RequestTimeoutError(KVServeError):
    """The request ran past its deadline (--request-timeout) and was aborted; maps to HTTP 408."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout = request_timeout  # seconds from arrival to the last output
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._closed = False  # set under _lock when the loop ends: no command is accepted after it
        self._stop = threading.Event()
        self.error: BaseException | None = None
        # engine statistics, refreshed on the engine thread; readers never touch live engine state
        self.stats: dict[str, float] = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stop.is_set()

    @property
    def tokenizer(self) -> Tokenizer:
        """The served model's tokenizer."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Prompt plus output tokens one request may reach."""
        return self.engine.max_model_len

    @property
    def model_config(self) -> ModelConfig:
        """The served model's architecture config."""
        return self.engine.lm.config

    # -- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        last_stats = 0.0
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    cmd = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    self._apply_isolated(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                busy = self.engine.has_unfinished_requests()
                if busy:
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                else:
                    self.engine.check_health()  # a dead parallel worker fails the engine even when idle
                # stats walk the block tables: refresh at most every STATS_PERIOD_S while busy
                now = time.monotonic()
                if not busy or now - last_stats >= STATS_PERIOD_S:
                    self.stats, last_stats = self.engine.stats(), now
        except BaseException as e:  # the engine died: fail everyone, never hang a client
            logger.exception("engine loop crashed")
            self.error = e
        finally:
            self._close()

    def _close(self) -> None:
        """Fail every open stream and every add still queued; later generate() calls fail at once."""
        dead = EngineDeadError(f"engine stopped: {self.error or 'shutdown'}")
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, dead)
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _settle(cmd[-1], dead)

    def _apply_isolated(self, cmd: tuple) -> None:
        """Apply one command; an Exception fails that command's request only."""
        try:
            self._apply(cmd)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the loop
            logger.exception("engine command %r for request %s failed", cmd[0], cmd[1])
            self._deliver(cmd[1], e)

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, fut = cmd
            if not fut.set_running_or_notify_cancel():  # the caller gave up before the engine got to it
                with self._lock:
                    self._streams.pop(rid, None)
                return
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:
                with self._lock:
                    self._streams.pop(rid, None)
                if not isinstance(e, InvalidRequestError):  # not a clean rejection: drop any half-added state
                    with contextlib.suppress(Exception):
                        self.engine.abort_request(rid)
                _settle(fut, e)
                return
            _settle(fut, None)
        elif kind == "abort":
            self.engine.abort_request(cmd[1])

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            entry = self._streams.get(rid)
            if entry is None:
                return
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(rid, None)
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # that client's event loop is closed: nobody is listening
            with self._lock:
                self._streams.pop(rid, None)

    # -- asyncio side -------------------------------------------------------------------

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them; aborts it if the consumer goes away."""
        if not self.alive:
            raise EngineDeadError("engine is not running")
        # waiting in the scheduler, plus adds the engine thread has not applied yet
        if self.max_waiting_requests is not None and \
                self.num_waiting() + self._commands.qsize() >= self.max_waiting_requests:
            raise QueueFullError(f"too many waiting requests ({self.max_waiting_requests}); retry later")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # with the loop's _close: a command is either drained by it or taken by the loop
            if self._closed:
                raise EngineDeadError(f"engine stopped: {self.error or 'shutdown'}")
            self._streams[request_id] = (loop, q)
            self._commands.put(("add", request_id, prompt, params, fut))
        finished = False
        deadline = None if self.request_timeout is None else loop.time() + self.request_timeout

        async def before_deadline(aw):  # noqa: ANN001, ANN202
            if deadline is None:
                return await aw
            try:
                return await asyncio.wait_for(aw, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestTimeoutError(f"request exceeded --request-timeout ({self.request_timeout:g} s)") from None

        try:
            try:
                await before_deadline(asyncio.wrap_future(fut))  # validation errors raise here
            except BaseException:
                # rejected, or cancelled before the engine took it (it then skips the add): nothing to
                # abort (the id may even be another request's). Cancelled once taken: the abort follows it.
                finished = fut.cancelled() or (fut.done() and fut.exception() is not None)
                raise
            while True:
                item = await before_deadline(q.get())
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # client gone or cancelled: free its blocks within a step
                with self._lock:
                    self._streams.pop(request_id, None)
                self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.engine.shutdown()  # parallel workers, if any


def _settle(fut: concurrent.futures.Future, error: BaseException | None) -> None:
    """Complete `fut` unless it is already done (cancelled by its caller, or completed): never twice."""
    if fut.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # raced a cancel
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
