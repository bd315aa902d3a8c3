"""Prometheus metrics under `kvserve:`, named after vLLM's."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvserve.engine.outputs import RequestOutput

RECENT_REQUESTS = 1000  # finished requests whose latencies /stats summarises
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, log_records_dropped: Callable[[], int] | None = None) -> None:
        """log_records_dropped: the serving process's count of log records dropped because its output was
        not being read (LogWriter.dropped_total), exported as a counter."""
        self.registry = CollectorRegistry()
        # plain totals and the latencies of the last requests, for /stats (the counters below hold the same sums)
        self.started = time.time()
        self.num_finished = self.num_prompt_tokens = self.num_generation_tokens = 0
        self.finished_by_reason: Tally[str] = Tally()
        self.recent: deque[dict] = deque(maxlen=RECENT_REQUESTS)
        r = self.registry
        self.running = Gauge("kvserve:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("kvserve:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("kvserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", registry=r)
        self.preemptions = Gauge("kvserve:num_preemptions", "Preemptions since start", registry=r)
        self.swaps = Gauge("kvserve:num_swaps", "Preemptions by swap since start", registry=r)
        self.cpu_threads = Gauge("kvserve:cpu_threads", "CPU threads the engine's kernels run on (0: not a CPU "
                                 "engine); they follow the cores other processes leave free", registry=r)
        self.blocks = Gauge("kvserve:kv_cache_blocks", "KV blocks by state", ["state"], registry=r)
        self.waste = Gauge("kvserve:kv_cache_internal_waste_perc",
                           "Fraction of slots in used KV blocks that hold no token", registry=r)
        self.prefix_queries = Gauge("kvserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Gauge("kvserve:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter("kvserve:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kvserve:generation_tokens", "Generated tokens of finished requests", registry=r)
        self.requests = Counter("kvserve:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("kvserve:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvserve:inter_token_latency_seconds", "Mean time between output tokens per request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        # data parallel: the same gauges per replica, and what the router sent where
        rep = ["replica"]
        self.rep_running = Gauge("kvserve:replica_num_requests_running", "Running requests per replica", rep, registry=r)
        self.rep_waiting = Gauge("kvserve:replica_num_requests_waiting", "Waiting requests per replica", rep, registry=r)
        self.rep_kv_usage = Gauge("kvserve:replica_kv_cache_usage_perc", "KV cache usage per replica", rep, registry=r)
        self.rep_prefix_queries = Gauge("kvserve:replica_prefix_cache_queries", "Prefix cache queries per replica",
                                        rep, registry=r)
        self.rep_prefix_hits = Gauge("kvserve:replica_prefix_cache_hits", "Prefix cache hits per replica", rep,
                                     registry=r)
        self.rep_routed = Gauge("kvserve:replica_requests_routed", "Requests the router sent to each replica", rep,
                                registry=r)
        self.rep_prefix_routed = Gauge("kvserve:replica_requests_routed_by_prefix",
                                       "Requests routed to a replica for its cached prefix", rep, registry=r)
        # speculative decoding (vLLM's names): counters follow the engine's totals
        self.spec_counters = {
            "spec_decode_num_drafts": Counter("kvserve:spec_decode_num_drafts", "Verify steps that carried a draft",
                                              registry=r),
            "spec_decode_num_draft_tokens": Counter("kvserve:spec_decode_num_draft_tokens", "Draft tokens verified",
                                                    registry=r),
            "spec_decode_num_accepted_tokens": Counter("kvserve:spec_decode_num_accepted_tokens",
                                                       "Draft tokens the target model accepted", registry=r),
        }
        self._spec_seen = dict.fromkeys(self.spec_counters, 0.0)
        self.spec_acceptance = Gauge("kvserve:spec_decode_draft_acceptance_rate",
                                     "Accepted / drafted tokens since start (0-1)", registry=r)
        self.spec_mean_len = Gauge("kvserve:spec_decode_mean_accepted_length",
                                   "Tokens emitted per verify step (accepted drafts + 1)", registry=r)
        self.queue = Histogram("kvserve:request_queue_time_seconds", "Time from arrival to first scheduling",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._log_dropped_source, self._log_dropped_seen = log_records_dropped, 0
        self.log_dropped = Counter("kvserve:log_records_dropped", "Log records dropped because the server's output "
                                   "was not being read (a full pipe)", registry=r)

    def update_gauges(self, st: dict) -> None:
        """Set the gauges from a stats snapshot (LLMEngine.stats() taken on the engine thread)."""
        self.running.set(st["num_requests_running"])
        self.waiting.set(st["num_requests_waiting"])
        self.kv_usage.set(st["kv_cache_usage_perc"])
        self.preemptions.set(st["num_preemptions"])
        self.swaps.set(st["num_swaps"])
        self.cpu_threads.set(st.get("cpu_threads", 0))
        for state in ("free", "cached", "used"):
            self.blocks.labels(state=state).set(st[f"blocks_{state}"])
        self.waste.set(st["kv_internal_waste_perc"])
        self.prefix_queries.set(st["prefix_cache_queries"])
        self.prefix_hits.set(st["prefix_cache_hits"])
        if "spec_decode_num_drafts" in st:
            for key, counter in self.spec_counters.items():
                delta = st[key] - self._spec_seen[key]
                if delta > 0:  # a snapshot older than the last one seen adds nothing
                    counter.inc(delta)
                    self._spec_seen[key] = st[key]
            self.spec_acceptance.set(st["spec_decode_acceptance_rate"])
            self.spec_mean_len.set(st["spec_decode_mean_accepted_length"])
        for i, rs in enumerate(st.get("per_replica", ())):
            lab = str(i)
            self.rep_running.labels(lab).set(rs["num_requests_running"])
            self.rep_waiting.labels(lab).set(rs["num_requests_waiting"])
            self.rep_kv_usage.labels(lab).set(rs["kv_cache_usage_perc"])
            self.rep_prefix_queries.labels(lab).set(rs["prefix_cache_queries"])
            self.rep_prefix_hits.labels(lab).set(rs["prefix_cache_hits"])
            self.rep_routed.labels(lab).set(rs["router_routed"])
            self.rep_prefix_routed.labels(lab).set(rs["router_prefix_routed"])

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        n_out = sum(len(c.token_ids) for c in out.outputs)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(n_out)
        self.num_prompt_tokens += len(out.prompt_token_ids)
        self.num_generation_tokens += n_out
        for c in out.outputs:
            self.requests.labels(finished_reason=c.finish_reason or "unknown").inc()
            self.num_finished += 1
            self.finished_by_reason[c.finish_reason or "unknown"] += 1
        tpot = None
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
            if m.ttft is not None and n_out > 1:
                tpot = (m.e2e - m.ttft) / (n_out - 1)
                self.itl.observe(tpot)
        self.recent.append({"ttft": m.ttft, "tpot": tpot, "e2e": m.e2e})
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))

    def render(self) -> tuple[bytes, str]:
        if self._log_dropped_source is not None:
            total = self._log_dropped_source()
            if total > self._log_dropped_seen:
                self.log_dropped.inc(total - self._log_dropped_seen)
                self._log_dropped_seen = total
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
