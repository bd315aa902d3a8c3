"""The serving process's output off the event loop and the engine thread.

A write to a pipe that nobody reads (a stalled log collector, a paused terminal, a parent process that
never drains its end) blocks once the pipe's 64 KiB are full. The request log writes a line per request
from the event loop, so one such stall used to freeze every route, /health included. Here every logging
handler is wrapped: emitting only enqueues, and one writer thread does the writes that may block. A full
queue drops records (counted); the writer says how many once it can write again."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import TextIO

DROPPED_MSG = "%d log records dropped: the server's output was not being read"
_FLUSH = object()


class _Enqueue(logging.Handler):
    """Stands in for `inner` on its logger: same level, never blocks."""

    def __init__(self, writer: LogWriter, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self.writer, self.inner = writer, inner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None  # the arguments may change before the write
        except Exception:  # noqa: BLE001 - a bad format string is reported as logging reports it
            self.handleError(record)
            return
        self.writer.put((self.inner, record))


class LogWriter:
    """One bounded queue and the thread that drains it into the real handlers and streams."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self.dropped = 0  # since the last record queued
        self.dropped_total = 0
        self._thread = threading.Thread(target=self._run, name="kvserve-log", daemon=True)
        self._thread.start()

    def wrap(self, handler: logging.Handler) -> logging.Handler:
        return _Enqueue(self, handler)

    def install(self) -> None:
        """Wrap the handlers of the root logger and of every configured logger (uvicorn's included)."""
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for lg in loggers:
            lg.handlers = [h if isinstance(h, _Enqueue) else self.wrap(h) for h in lg.handlers]
        logging.captureWarnings(True)  # warnings.warn writes to stderr directly otherwise

    def print(self, text: str, file: TextIO | None = None) -> None:
        """`print(text, file=file, flush=True)`, from the writer thread (file: sys.stderr by default)."""
        self.put((file or sys.stderr, text))

    def put(self, item: tuple) -> None:
        """Queue (target, what): a handler and its record, or a stream and its text; drop it when full."""
        with self._lock:  # the first record queued after drops carries their count, written before it
            try:
                self._queue.put_nowait((*item, self.dropped))
            except queue.Full:
                self.dropped += 1
                self.dropped_total += 1
            else:
                self.dropped = 0

    def flush(self, timeout: float) -> bool:
        """Wait until what was queued so far is written (False: still blocked after `timeout` s)."""
        done, deadline = threading.Event(), time.monotonic() + timeout
        try:
            self._queue.put((_FLUSH, done, 0), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            target, item, dropped = self._queue.get()
            if target is _FLUSH:
                item.set()
                continue
            try:
                if isinstance(target, logging.Handler):
                    if dropped:
                        target.handle(logging.LogRecord("kvserve", logging.WARNING, __file__, 0, DROPPED_MSG,
                                                        (dropped,), None))
                    target.handle(item)
                else:
                    if dropped:
                        print(DROPPED_MSG % dropped, file=target)
                    print(item, file=target, flush=True)
            except Exception:  # noqa: BLE001 - a closed stream, a failing filter: the writer must go on
                pass
