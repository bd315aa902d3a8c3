"""The JSON behind /stats and the dashboard: the engine's gauges now, a ring of recent step records, and
latency percentiles and throughput over a recent window.

Step records are taken on the engine thread by a step observer (LLMEngine.step_observers): a few
attribute reads per scheduled request, no walk of the block tables. Readers on the event loop only copy
the ring (a deque: append and list() are atomic under the GIL), so neither side waits for the other.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from kvserve.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.openai.metrics import Metrics

STEP_RING = 4096  # step records kept (a poller asks for those after the last `seq` it saw)
THROUGHPUT_WINDOW_S = 10.0
PERCENTILES = (50, 90, 99)


class StepHistory:
    """A bounded ring of per-step records, fed by one StepRecorder per engine (replica)."""

    def __init__(self, maxlen: int = STEP_RING) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)  # next() is atomic: replicas' threads may share one history

    def attach(self, engine: LLMEngine, replica: int = 0) -> None:
        engine.step_observers.append(StepRecorder(engine, replica, self))

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Records with a sequence number above `seq`, oldest first."""
        snap = list(self.records)
        if seq <= 0:
            return snap
        i = len(snap)
        while i > 0 and snap[i - 1]["seq"] > seq:
            i -= 1
        return snap[i:]


class StepRecorder:
    """The step observer: one record per engine step that scheduled anything."""

    def __init__(self, engine: LLMEngine, replica: int, history: StepHistory) -> None:
        self.engine, self.replica, self.history = engine, replica, history

    def __call__(self, so: SchedulerOutput, dt: float) -> None:
        if not so.scheduled:
            return
        prefill = decode = structured = 0
        for s in so.scheduled:
            r = s.request
            n = s.num_new_tokens - len(s.spec_token_ids)
            if n == 1 and s.start >= r.num_prompt_tokens:
                decode += s.num_new_tokens  # the last token, plus the draft tokens verified with it
            else:
                prefill += s.num_new_tokens  # a prompt chunk (or a preempted request's recompute)
            structured += r.grammar is not None
        e = self.engine
        sched, kv, spec = e.scheduler, e.kv, e.scheduler.spec_stats
        self.history.records.append({
            "seq": next(self.history._seq), "time": time.time(), "replica": self.replica,
            "step_seconds": dt, "prefill_tokens": prefill, "decode_tokens": decode,
            "batch_size": len(so.scheduled), "running": len(sched.running), "waiting": len(sched.waiting),
            "preempted": len(so.preempted), "num_preemptions": sched.num_preemptions,
            "kv_cache_usage_perc": kv.usage(),
            "prefix_cache_hit_rate": kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
            "structured_requests": structured,
            "spec_decode_acceptance_rate": spec.acceptance_rate,
        })


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """count, mean and p50/p90/p99 (nearest rank) of `values`; None for an empty list."""
    out: dict[str, float | int | None] = {"count": len(values)}
    if not values:
        return {**out, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    v = sorted(values)
    out["mean"] = sum(v) / len(v)
    for p in PERCENTILES:
        out[f"p{p}"] = v[max(0, math.ceil(p / 100 * len(v)) - 1)]
    return out


def throughput(records: list[dict[str, Any]], now: float, window: float = THROUGHPUT_WINDOW_S) -> dict[str, float]:
    """Tokens and steps per second over the last `window` seconds of step records."""
    recent = [r for r in records if r["time"] >= now - window]
    span = min(window, now - recent[0]["time"] + recent[0]["step_seconds"]) if recent else window
    span = max(span, 1e-3)
    return {"window_seconds": span,
            "prefill_tokens_per_s": sum(r["prefill_tokens"] for r in recent) / span,
            "decode_tokens_per_s": sum(r["decode_tokens"] for r in recent) / span,
            "steps_per_s": len(recent) / span}


def roofline_figures(tp: dict[str, float], weight_bytes: int, num_params: int, peaks: Any) -> dict[str, Any]:
    """The throughput window against the machine's peaks: every step streams each weight once, every token
    computed costs 2 FLOP per parameter (data-parallel replicas each stream their own copy, so their
    steps add up). `peaks`: a kvserve.roofline.Peaks, or None before `kvserve roofline` has measured them."""
    from kvserve import roofline

    bytes_s = tp["steps_per_s"] * weight_bytes
    flop_s = 2.0 * num_params * (tp["prefill_tokens_per_s"] + tp["decode_tokens_per_s"])
    return {"weight_gb_per_s": bytes_s / 1e9, "gflop_per_s": flop_s / 1e9,
            "flop_per_byte": flop_s / bytes_s if bytes_s else 0.0,
            "peak_read_gb_per_s": peaks.read_bandwidth_gb_s if peaks is not None else None,
            "peak_gflop_per_s": peaks.gemm_gflop_s if peaks is not None else None,
            "line": roofline.line(peaks, bytes_s, flop_s)}


def snapshot(engine_stats: dict, metrics: Metrics, history: StepHistory, since: int = 0,
             model: tuple[int, int, Any] | None = None) -> dict[str, Any]:
    """The /stats body; `model`: (weight bytes, parameters, the machine's peaks or None) for the roofline."""
    now = time.time()
    gauges = {k: v for k, v in engine_stats.items() if k != "per_replica"}
    queries = gauges.get("prefix_cache_queries", 0)
    gauges["prefix_cache_hit_rate"] = gauges.get("prefix_cache_hits", 0) / queries if queries else 0.0
    recent = list(metrics.recent)
    all_steps = history.since(0)
    return {
        "time": now,
        "uptime_seconds": now - metrics.started,
        "engine": gauges,
        "totals": {"requests_finished": metrics.num_finished, "prompt_tokens": metrics.num_prompt_tokens,
                   "generation_tokens": metrics.num_generation_tokens,
                   "finished_by_reason": dict(metrics.finished_by_reason)},
        "latency": {"window_requests": len(recent),
                    "ttft_seconds": percentiles([r["ttft"] for r in recent if r["ttft"] is not None]),
                    "tpot_seconds": percentiles([r["tpot"] for r in recent if r["tpot"] is not None]),
                    "e2e_seconds": percentiles([r["e2e"] for r in recent if r["e2e"] is not None])},
        "throughput": (tp := throughput(all_steps, now)),
        "roofline": roofline_figures(tp, *model) if model is not None else None,
        "last_seq": all_steps[-1]["seq"] if all_steps else 0,
        "steps": history.since(since),
    }


_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_PCT = {"type": "object", "required": ["count", "mean", *(f"p{p}" for p in PERCENTILES)],
        "properties": {"count": {"type": "integer"}, "mean": _OPT_NUM, **{f"p{p}": _OPT_NUM for p in PERCENTILES}}}
# per step: tokens computed (prefill: prompt chunks and recomputes; decode: last tokens and verified drafts),
# requests in the batch, then the state after the step (running / waiting, KV usage); preempted this step,
# preemptions, prefix-cache hit rate and speculative acceptance since start; replica: data-parallel index
STEP_FIELDS = ("seq", "time", "replica", "step_seconds", "prefill_tokens", "decode_tokens", "batch_size", "running",
               "waiting", "preempted", "num_preemptions", "kv_cache_usage_perc", "prefix_cache_hit_rate",
               "structured_requests", "spec_decode_acceptance_rate")
# the OpenAPI schema of the /stats body (openapi.py puts it in the document)
SCHEMA = {
    "title": "StatsResponse", "type": "object",
    "required": ["time", "uptime_seconds", "engine", "totals", "latency", "throughput", "last_seq", "steps"],
    "properties": {
        "time": _NUM, "uptime_seconds": _NUM, "last_seq": {"type": "integer"},
        "engine": {"type": "object", "description": "the gauges of /metrics (kvserve:<name>), plus the hit rate",
                   "additionalProperties": _NUM},
        "totals": {"type": "object", "required": ["requests_finished", "prompt_tokens", "generation_tokens"],
                   "properties": {"requests_finished": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
                                  "generation_tokens": {"type": "integer"},
                                  "finished_by_reason": {"type": "object",
                                                         "additionalProperties": {"type": "integer"}}}},
        "latency": {"type": "object", "description": "over the last finished requests (window_requests of them)",
                    "properties": {"window_requests": {"type": "integer"}, "ttft_seconds": _PCT,
                                   "tpot_seconds": _PCT, "e2e_seconds": _PCT}},
        "throughput": {"type": "object", "additionalProperties": _NUM},
        "roofline": {"type": ["object", "null"], "description": "the throughput window against the machine's "
                     "peaks (null peaks until `kvserve roofline` has measured them)",
                     "properties": {"weight_gb_per_s": _NUM, "gflop_per_s": _NUM, "flop_per_byte": _NUM,
                                    "peak_read_gb_per_s": {"type": ["number", "null"]},
                                    "peak_gflop_per_s": {"type": ["number", "null"]}, "line": {"type": "string"}}},
        "steps": {"type": "array", "description": "engine steps after `since`, oldest first (a bounded ring)",
                  "items": {"type": "object", "required": list(STEP_FIELDS),
                            "properties": {k: _NUM for k in STEP_FIELDS}}},
    },
}
