"""Discrete-event serving simulator: the real Scheduler and KVCacheManager on a virtual clock.

Nothing about scheduling is re-implemented here. Each replica owns a `Scheduler` (with the
chosen policy) and a `KVCacheManager`; a step is `schedule()`, a step time from the cost
model, then the scheduler's own `update_from_output()` with a placeholder token for every
sampling row — the EOS token when it is the request's last of its workload output length, so
the real stop rules finish it (or max_tokens does). Arrivals are added
between steps, as the real engine adds them, with their true arrival times. Deterministic: the
same workload and configuration give the same result.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.policy import make_policy
from kvserve.engine.request import Request
from kvserve.engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig
from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams
from kvserve.sim.cost_model import CostModel, batch_features, percentile
from kvserve.sim.workload import WorkItem

PLACEHOLDER_TOKEN = 0
EOS_TOKEN = 1  # a simulated request's last token: the real stop rules end it


@dataclass
class SimConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    preemption_mode: str = "recompute"
    num_host_blocks: int = 0
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    scheduling_max_wait: float | None = None
    replicas: int = 1


@dataclass
class RequestRecord:
    request_id: str
    arrival: float
    first_scheduled: float
    first_token: float
    finish: float
    queue_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    predicted_output_tokens: float | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def latency(self) -> float:
        return self.finish - self.arrival


@dataclass
class SimResult:
    records: list[RequestRecord]
    num_steps: int
    num_preemptions: int
    kv_usage_mean: float  # time-weighted over busy steps
    kv_usage_max: float
    busy_time: float
    summary: dict[str, float] = field(default_factory=dict)


def summarize(records: list[RequestRecord]) -> dict[str, float]:
    """Throughput and latency figures of finished requests (shared with the real-engine benchmark)."""
    if not records:
        return {}
    lat = [r.latency for r in records]
    ttft = [r.ttft for r in records]
    n_out = sum(r.num_output_tokens for r in records)
    span = max(r.finish for r in records) - min(r.arrival for r in records)
    return {
        "requests": len(records),
        "duration_s": span,
        "throughput_req_s": len(records) / span,
        "throughput_out_tok_s": n_out / span,
        "latency_mean_s": sum(lat) / len(lat),
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_mean_s": sum(ttft) / len(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "normalized_latency_mean_s": sum(r.latency / max(r.num_output_tokens, 1) for r in records) / len(records),
        "worst_wait_s": max(r.queue_time for r in records),
        "preempted_requests": sum(1 for r in records if r.num_preemptions),
    }


class _Replica:
    def __init__(self, cfg: SimConfig, cost: CostModel) -> None:
        self.t = 0.0  # the time this replica's next step may start
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.num_host_blocks)
        sched_cfg = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                                    cfg.preemption_mode)
        policy = make_policy(cfg.scheduling_policy, cfg.scheduling_max_wait)
        self.scheduler = Scheduler(sched_cfg, self.kv, policy, clock=lambda: self.t)
        self.cost = cost
        self.targets: dict[str, int] = {}
        self.num_steps = 0
        self.busy = 0.0
        self.kv_area = 0.0
        self.kv_max = 0.0

    def add(self, req: Request, target: int) -> None:
        if not self.scheduler.has_unfinished():
            self.t = max(self.t, req.arrival_time)  # an idle replica wakes up at the arrival
        self.targets[req.request_id] = target
        self.scheduler.add(req)

    def step(self) -> list[Request]:
        s = self.scheduler
        so = s.schedule()
        if so.is_empty:
            # only when a waiting request can never fit (add_request-like validation failed upstream)
            raise RuntimeError("simulated engine cannot schedule its waiting requests")
        dt = max(self.cost.step_time(batch_features(so)), 1e-6)
        usage = self.kv.usage()  # the step's blocks, before finished requests free theirs
        self.t += dt
        self.num_steps += 1
        self.busy += dt
        self.kv_area += usage * dt
        self.kv_max = max(self.kv_max, usage)
        result = RunnerOutput()
        for x in so.scheduled:
            if x.samples:
                r = x.request
                last = len(r.output_token_ids) + 1 >= self.targets[r.request_id]
                result.sampled[r.request_id] = [EOS_TOKEN if last else PLACEHOLDER_TOKEN]
        return s.update_from_output(so, result)


class Simulator:
    def __init__(self, cfg: SimConfig, cost: CostModel) -> None:
        if cfg.replicas < 1:
            raise InvalidRequestError("replicas must be >= 1")
        self.cfg = cfg
        self.cost = cost

    def _request(self, w: WorkItem, i: int) -> Request:
        cfg = self.cfg
        if w.num_prompt_tokens + 1 > cfg.max_model_len:
            raise InvalidRequestError(f"workload item {i}: prompt of {w.num_prompt_tokens} tokens exceeds max_model_len")
        max_tokens = min(w.max_tokens, cfg.max_model_len - w.num_prompt_tokens)
        if -(-(w.num_prompt_tokens + max_tokens) // cfg.block_size) > cfg.num_blocks:
            raise InvalidRequestError(f"workload item {i}: needs more KV blocks than the cache holds")
        params = SamplingParams(max_tokens=max_tokens, priority=w.priority, temperature=0.0)
        return Request(w.request_id or f"sim-{i}", w.prompt_token_ids(i), params, [EOS_TOKEN], cfg.max_model_len,
                       w.arrival)

    def run(self, workload: list[WorkItem]) -> SimResult:
        replicas = [_Replica(self.cfg, self.cost) for _ in range(self.cfg.replicas)]
        pending = deque(sorted(enumerate(workload), key=lambda iw: (iw[1].arrival, iw[0])))
        finished: list[Request] = []
        while pending or any(r.scheduler.has_unfinished() for r in replicas):
            busy = [r for r in replicas if r.scheduler.has_unfinished()]
            nxt = min(busy, key=lambda r: r.t) if busy else None
            if pending and (nxt is None or pending[0][1].arrival <= nxt.t):
                i, w = pending.popleft()
                # join the replica with the fewest unfinished requests (ties: the first)
                target = min(replicas, key=lambda r: len(r.scheduler.requests))
                target.add(self._request(w, i), max(1, w.output_len))
                continue
            assert nxt is not None
            finished += nxt.step()
        records = [RequestRecord(
            r.request_id, r.arrival_time, r.first_scheduled_time or r.arrival_time, r.first_token_time or r.finish_time,
            r.finish_time, r.queue_time, r.num_prompt_tokens, len(r.output_token_ids), r.num_preemptions,
            r.predicted_output_tokens) for r in finished]
        busy = sum(r.busy for r in replicas)
        return SimResult(
            records=sorted(records, key=lambda x: x.arrival),
            num_steps=sum(r.num_steps for r in replicas),
            num_preemptions=sum(r.scheduler.num_preemptions for r in replicas),
            kv_usage_mean=sum(r.kv_area for r in replicas) / busy if busy else 0.0,
            kv_usage_max=max(r.kv_max for r in replicas),
            busy_time=busy,
            summary=summarize(records),
        )
