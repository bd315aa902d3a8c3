"""CPU threads that follow the cores other processes leave free.

A step's kernels split their work over OpenMP threads that meet at a barrier after every parallel
loop. When another process runs on one of the engine's cores, the thread there loses whole time
slices while its partner waits at the barrier, spinning: measured on 2 cores with one busy loop
beside the engine, the default model decoded 28 tok/s with 2 threads (353 on a quiet machine) and 197
with 1, and a 512-token prompt took 1.7 s instead of 0.46. So, unless the user fixed the thread count,
the engine looks four times a second at how much of its cores other processes used (the kernel's
per-CPU counters in /proc/stat for the CPUs it may run on, less its own CPU time) and runs as many
threads as cores are left: all of them while others use at most half a core, one fewer for each
core they take beyond that, never fewer than 1. Threads are dropped at the first look that asks for it
(a contended step is many times slower) and added back when two looks in a row agree.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(cpus: set[int], path: str = "/proc/stat") -> float | None:
    """CPU seconds spent busy (anything but idle and iowait) on `cpus` since boot; None where unknown."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return None
    total, seen = 0, 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        total += sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal
        seen += 1
    return total / _TICK if seen else None


class ThreadGovernor:
    """Chooses the engine's CPU thread count from the cores other processes use (module docstring)."""

    INTERVAL = 0.25  # seconds between looks (/proc/stat counts in 10 ms ticks: 2% of 2 cores)
    STALE = 1.0  # a look further apart than this (the engine sat idle) only starts a new measurement
    SLACK = 0.5  # cores others may use before a thread gives way (at half a core 1 and 2 threads tied)

    def __init__(self, max_threads: int, cpus: set[int] | None = None,
                 read_busy: Callable[[], float | None] | None = None,
                 own_cpu: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic) -> None:
        if cpus is None:  # macOS has no affinity call (nor /proc/stat: there the governor never acts)
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cpus = set(cpus)
        self.max_threads = max(1, min(max_threads, len(self.cpus)))
        self.threads = self.max_threads
        self._read_busy = read_busy or (lambda: busy_seconds(self.cpus))
        self._own_cpu, self._clock = own_cpu, clock
        self._last: tuple[float, float, float] | None = None
        self._pending: int | None = None
        self.others = 0.0  # cores other processes used over the last look
        self.changes = 0  # thread count changes made
        self.tick()  # the first look: what the next one measures from
        self.active = self._last is not None  # False without /proc/stat (macOS): the engine keeps no governor

    def wanted(self, others: float) -> int:
        """Threads for a machine where others use `others` cores."""
        return max(1, min(self.max_threads, len(self.cpus) - math.ceil(others - self.SLACK)))

    def tick(self) -> int | None:
        """Called every step; returns a new thread count when it should change, else None."""
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.INTERVAL:
            return None
        busy = self._read_busy()
        if busy is None:
            return None
        own, last = self._own_cpu(), self._last
        self._last = (now, busy, own)
        if last is None or now - last[0] > self.STALE:  # load seen while the engine idled says little of now
            self._pending = None
            return None
        self.others = max(0.0, ((busy - last[1]) - (own - last[2])) / (now - last[0]))
        want = self.wanted(self.others)
        if want == self.threads:
            self._pending = None
            return None
        if want > self.threads and self._pending != want:  # a core freed once may be a blip: twice in a row
            self._pending = want
            return None
        self._pending, self.threads = None, want
        self.changes += 1
        return want
