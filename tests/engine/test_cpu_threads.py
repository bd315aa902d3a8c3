"""The CPU thread governor: threads give way to other processes' load and come back when it goes."""

from __future__ import annotations

import os

import pytest
import torch

from kvserve.engine import cpu_threads
from kvserve.engine.cpu_threads import ThreadGovernor, busy_seconds
from helpers import make_tiny_hf


class Machine:
    """A fake clock, /proc/stat busy counter and own CPU time: `run(dt, others, own)` advances them."""

    def __init__(self) -> None:
        self.t = self.busy = self.own = 0.0

    def run(self, dt: float, others: float, own: float = 1.0) -> None:
        self.t += dt
        self.busy += dt * (others + own)
        self.own += dt * own

    def governor(self, max_threads: int = 2, cpus: int = 2) -> ThreadGovernor:
        return ThreadGovernor(max_threads, cpus=set(range(cpus)), read_busy=lambda: self.busy,
                              own_cpu=lambda: self.own, clock=lambda: self.t)


def test_threads_drop_at_once_under_load_and_return_after_two_quiet_looks():
    m = Machine()
    gov = m.governor()
    m.run(0.5, others=0.05, own=2.0)
    assert gov.tick() is None and gov.threads == 2 and abs(gov.others - 0.05) < 1e-9
    m.run(0.5, others=0.9, own=1.1)  # a busy loop on the second core
    assert gov.tick() == 1 and gov.threads == 1
    m.run(0.1, others=0.0)
    assert gov.tick() is None  # looks are INTERVAL apart
    m.run(0.5, others=0.95)
    assert gov.tick() is None and gov.threads == 1
    m.run(0.5, others=0.0)
    assert gov.tick() is None and gov.threads == 1  # one quiet look may be a blip
    m.run(0.5, others=0.6)
    assert gov.tick() is None and gov.threads == 1  # ... and it was
    m.run(0.5, others=0.0)
    assert gov.tick() is None
    m.run(0.5, others=0.1)
    assert gov.tick() == 2 and gov.threads == 2 and gov.changes == 2


def test_threads_are_the_cores_left_between_one_and_the_maximum():
    m = Machine()
    gov = m.governor(max_threads=6, cpus=8)
    assert gov.max_threads == 6 and gov.threads == 6
    # 8 cores: all 6 threads while others leave 5.5 cores, then one fewer per core they take
    assert [gov.wanted(x) for x in (0.0, 0.5, 2.5, 2.6, 3.5, 3.6, 7.9, 20.0)] == [6, 6, 6, 5, 5, 4, 1, 1]
    assert m.governor(max_threads=16, cpus=4).max_threads == 4  # never more threads than cores
    m.run(1.0, others=3.2)
    assert gov.tick() == 5


def test_busy_seconds_reads_the_cores_of_the_affinity_set(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 100 5000 50 0 0 0 0 0\n"
                    "cpu0 300 0 20 2000 10 0 5 5 0 0\n"  # busy: 300 + 20 + 5 + 5 = 330 ticks
                    "cpu1 600 0 80 3000 40 1 0 9 0 0\n"  # 690
                    "intr 1 2 3\n")
    assert busy_seconds({0}, str(stat)) == 330 / cpu_threads._TICK
    assert busy_seconds({0, 1}, str(stat)) == 1020 / cpu_threads._TICK
    assert busy_seconds({5}, str(stat)) is None and busy_seconds({0}, str(tmp_path / "none")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat (not Linux)")
def test_busy_seconds_parses_this_machines_counters():
    cpus = os.sched_getaffinity(0)
    first = busy_seconds(cpus)
    assert first is not None and first > 0
    sum(i * i for i in range(300_000))  # some work of our own: the counters never go back
    assert busy_seconds(cpus) >= first


def test_a_look_after_the_engine_idled_starts_a_new_measurement():
    m = Machine()
    gov = m.governor()
    m.run(1.0, others=0.0, own=2.0)
    assert gov.tick() is None and gov.threads == 2
    m.run(30.0, others=1.0, own=0.0)  # another program ran while the engine had nothing to do
    assert gov.tick() is None and gov.threads == 2  # stale: only a new baseline
    m.run(0.5, others=0.0, own=2.0)  # ... and it is gone now that the engine runs
    assert gov.tick() is None and gov.threads == 2 and gov.changes == 0
    m.run(0.5, others=1.0, own=1.0)  # a load that starts while the engine runs is seen at the next look
    assert gov.tick() == 1


def test_engine_follows_the_governor_unless_threads_are_fixed(tmp_path, monkeypatch):
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    path = str(make_tiny_hf(tmp_path, "llama"))
    assert LLMEngine(model=path, kv_cache_memory="4MiB").thread_governor is None  # the suite's setting (conftest)
    monkeypatch.setenv("KVSERVE_CPU_THREAD_GOVERNOR", "1")  # the default: on
    assert LLMEngine(model=path, kv_cache_memory="4MiB", num_threads=1).thread_governor is None
    before = torch.get_num_threads()
    engine = LLMEngine(model=path, kv_cache_memory="4MiB")
    assert engine.thread_governor is not None and engine.stats()["cpu_threads"] == before
    try:
        engine.thread_governor.tick = lambda: 1  # as if another process took a core
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
        while engine.has_unfinished_requests():
            engine.step()
        assert torch.get_num_threads() == 1 and engine.stats()["cpu_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_without_an_affinity_call_or_proc_stat_the_governor_keeps_its_threads(monkeypatch):
    """macOS: no os.sched_getaffinity and no /proc/stat; the governor takes every CPU and never changes."""
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    gov = ThreadGovernor(64, read_busy=lambda: None)
    assert gov.cpus == set(range(os.cpu_count())) and gov.threads == gov.max_threads
    assert not gov.active  # the engine keeps no governor then (and reads no file per step)
    assert ThreadGovernor(64, read_busy=lambda: 1.0).active
