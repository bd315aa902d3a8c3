"""Logging through LogWriter never blocks its caller, even while the stream under it cannot be written."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

from kvserve.entrypoints.log_writer import LogWriter
from kvserve.entrypoints.openai.metrics import Metrics


class _StalledStream(io.StringIO):
    """A stream whose writes wait until `go` is set (a pipe that nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def write(self, s: str) -> int:
        self.go.wait()
        return super().write(s)


def test_a_stalled_stream_does_not_block_the_logger_and_drops_are_reported():
    stream = _StalledStream()
    writer = LogWriter(maxsize=50)
    log = logging.getLogger("kvserve.test_log_writer")
    log.propagate, log.handlers = False, [writer.wrap(logging.StreamHandler(stream))]
    log.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        for i in range(500):
            log.info("line %d", i)
        writer.print("plain text", file=stream)
        assert time.perf_counter() - t0 < 1.0  # the writes all wait on `go`: the calls returned anyway
        assert not writer.flush(timeout=0.2)  # still stalled
        dropped = writer.dropped_total
        metrics = Metrics(log_records_dropped=lambda: writer.dropped_total)  # as `kvserve serve` wires it
        assert f"kvserve:log_records_dropped_total {float(dropped)}" in metrics.render()[0].decode()
        assert dropped >= 500 + 1 - 50 - 1  # 50 queued and 1 being written; a record that found room
        stream.go.set()                      # in between (the writer took its first) carries a count
        assert writer.flush(timeout=5)
        assert stream.getvalue().splitlines()[:2] == ["line 0", "line 1"]
        writer.print("plain text", file=stream)  # the stream is written again: the drops are told first
        log.info("after %s", "the stall")
        assert writer.flush(timeout=5)
        lines = stream.getvalue().splitlines()
        told = [int(n) for n in re.findall(r"^(\d+) log records dropped: the server's output was not being read$",
                                           stream.getvalue(), re.M)]
        assert lines[-2:] == ["plain text", "after the stall"]
        assert told and sum(told) == dropped == writer.dropped_total and writer.dropped == 0
        assert len(lines) == 503 - dropped + len(told)  # all that was queued, and the counts
    finally:
        stream.go.set()  # else the writer thread holds the handler's lock for good, and logging.shutdown waits
        log.handlers = []
