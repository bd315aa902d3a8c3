"""Scheduling policies on hand-made queues, starvation bounds, and preempt+resume bookkeeping."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TINY_VOCAB, FakeRunner, make_tiny_hf, random_ids
from kvserve import SamplingParams
from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.length_predictor import OnlineLengthPredictor
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.policy import (LPFPolicy, MLFQPolicy, PriorityPolicy, SchedulingPolicy, kendall_tau,
                                   make_policy)
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig
from kvserve.errors import InvalidRequestError
from kvserve.loader import load_model


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FixedPredictor:
    """Predicts a given length per request id; records what it was taught."""

    def __init__(self, lengths: dict[str, float]) -> None:
        self.lengths = lengths
        self.seen: list[str] = []

    def predict(self, req: Request) -> float:
        return self.lengths[req.request_id]

    def observe(self, req: Request) -> None:
        self.seen.append(req.request_id)


def make_sched(policy: SchedulingPolicy | None, max_num_seqs: int = 1, num_blocks: int = 256, block_size: int = 4,
               budget: int = 64, mode: str = "recompute") -> tuple[Scheduler, Clock]:
    clock = Clock()
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False, num_host_blocks=64)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=4096,
                          preemption_mode=mode)
    return Scheduler(cfg, kv, policy, clock), clock


def req(rid: str, out_len: int, prompt_len: int = 4, arrival: float = 0.0, priority: int = 0,
        max_tokens: int | None = None) -> Request:
    """A request that finishes after `out_len` tokens (its max_tokens unless given)."""
    prompt = [sum(map(ord, rid)) % 97 + i for i in range(prompt_len)]
    r = Request(rid, prompt, SamplingParams(max_tokens=max_tokens or out_len, priority=priority), [EOS], 4096, arrival)
    r.target = out_len  # type: ignore[attr-defined]
    return r


EOS = 99


def step(s: Scheduler, clock: Clock, dt: float = 1.0) -> list[str]:
    """One step with a fake model: every sampling row gets token 7, or EOS as its target-th token;
    the scheduler's own update applies them. Returns the ids that finished."""
    so = s.schedule()
    clock.t += dt
    out = RunnerOutput()
    for sr in so.scheduled:
        if sr.samples:
            r = sr.request
            out.sampled[r.request_id] = [EOS if len(r.output_token_ids) + 1 >= getattr(r, "target", 1 << 30) else 7]
    done = [r.request_id for r in s.update_from_output(so, out)]
    s.kv.check_invariants()
    return done


def run(s: Scheduler, clock: Clock, max_steps: int = 10_000) -> list[str]:
    order = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return order
        order += step(s, clock)
    raise AssertionError("did not finish")


# -- ordering on hand-made queues ---------------------------------------------------------


def test_fcfs_keeps_arrival_order():
    s, clock = make_sched(make_policy("fcfs"))
    for i, n in enumerate([5, 1, 3, 2]):
        s.add(req(f"r{i}", n, arrival=i * 0.1))
    assert run(s, clock) == ["r0", "r1", "r2", "r3"]
    assert s.num_preemptions == 0


def test_priority_orders_waiting_and_breaks_ties_by_arrival():
    s, clock = make_sched(make_policy("priority"))
    for i, p in enumerate([2, 0, 1, 0, 2]):
        s.add(req(f"r{i}", 1, arrival=i * 0.1, priority=p))
    assert run(s, clock) == ["r1", "r3", "r2", "r0", "r4"]


def test_priority_preempts_lower_priority_for_a_seat():
    s, clock = make_sched(make_policy("priority"), max_num_seqs=2)
    s.add(req("low0", 20, priority=5))
    s.add(req("low1", 20, priority=3))
    step(s, clock)
    assert {r.request_id for r in s.running} == {"low0", "low1"}
    s.add(req("high", 2, arrival=clock.t, priority=0))
    step(s, clock)
    # the worst-ranked running request (priority 5) gave its seat
    assert {r.request_id for r in s.running} == {"low1", "high"}
    assert s.requests["low0"].status == RequestStatus.PREEMPTED and s.num_preemptions == 1
    assert run(s, clock) == ["high", "low1", "low0"]


def test_priority_equal_never_preempts():
    s, clock = make_sched(make_policy("priority"), max_num_seqs=1)
    s.add(req("a", 5, priority=1))
    step(s, clock)
    s.add(req("b", 1, arrival=clock.t, priority=1))
    assert run(s, clock) == ["a", "b"] and s.num_preemptions == 0


def test_priority_preempts_for_blocks_when_memory_is_short():
    # 8 blocks of 4 tokens: the low-priority request holds 5; the high one needs 4
    s, clock = make_sched(make_policy("priority"), max_num_seqs=4, num_blocks=8)
    s.add(req("low", 20, prompt_len=12, priority=1))
    for _ in range(8):
        step(s, clock)
    assert s.kv.pool.num_free_blocks < 4
    s.add(req("big", 3, prompt_len=16, arrival=clock.t, priority=0))
    step(s, clock)
    assert s.requests["big"].status == RequestStatus.RUNNING
    assert s.requests["low"].status == RequestStatus.PREEMPTED
    assert run(s, clock) == ["big", "low"]


def test_lpf_orders_by_predicted_length_and_learns():
    pred = FixedPredictor({"a": 50, "b": 2, "c": 10, "d": 2})
    s, clock = make_sched(LPFPolicy(predictor=pred), max_num_seqs=1)
    for i, rid in enumerate("abcd"):
        s.add(req(rid, 3, arrival=i * 0.1, max_tokens=100))
    assert run(s, clock) == ["b", "d", "c", "a"]
    assert sorted(pred.seen) == ["a", "b", "c", "d"]  # every finished request was observed


def test_lpf_corrects_a_misprediction_as_tokens_come():
    r = req("x", 100)
    r.predicted_output_tokens = 4.0
    assert LPFPolicy.remaining(r) == 4.0
    for _ in range(3):
        r.append_token(7)
    assert LPFPolicy.remaining(r) == 1.0
    for _ in range(7):
        r.append_token(7)  # 10 produced, 4 predicted: now expected to run as long again
    assert LPFPolicy.remaining(r) == 10.0
    for _ in range(85):
        r.append_token(7)
    assert LPFPolicy.remaining(r) == 5.0  # never past max_tokens


def test_lpf_preempts_a_long_runner_for_a_much_shorter_arrival():
    pred = FixedPredictor({"long": 40, "short": 3, "similar": 30})
    s, clock = make_sched(LPFPolicy(predictor=pred), max_num_seqs=1)
    s.add(req("long", 40))
    for _ in range(5):
        step(s, clock)
    s.add(req("similar", 30, arrival=clock.t))  # 30 vs 35 left: hysteresis keeps the runner
    step(s, clock)
    assert s.running[0].request_id == "long"
    s.add(req("short", 3, arrival=clock.t))
    step(s, clock)
    assert s.running[0].request_id == "short" and s.requests["long"].num_preemptions == 1
    assert run(s, clock)[0] == "short"


def test_mlfq_skip_join_and_demotion():
    p = MLFQPolicy(num_levels=4, base_quantum=2, prefill_tokens_per_step=8)  # quanta 2, 4, 8, 16
    assert [p.join_level(n) for n in (1, 16, 17, 40, 1000)] == [0, 0, 1, 2, 3]
    r = req("x", 100, prompt_len=4)
    levels = []
    for _ in range(16):
        levels.append(p.level(r))
        r.append_token(7)
    assert levels == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3]


def test_mlfq_new_arrival_preempts_a_demoted_request():
    s, clock = make_sched(MLFQPolicy(base_quantum=2), max_num_seqs=1)
    s.add(req("old", 30))
    for _ in range(4):  # 4 tokens: demoted to level 1
        step(s, clock)
    s.add(req("new", 2, arrival=clock.t))
    done = step(s, clock)
    assert s.running[0].request_id == "new" and s.num_preemptions == 1 and not done
    assert run(s, clock) == ["new", "old"]
    assert s.requests == {}


def test_unknown_policy_is_a_typed_error():
    with pytest.raises(InvalidRequestError, match="scheduling policy"):
        make_policy("sjf")
    with pytest.raises(InvalidRequestError, match="max_wait"):
        make_policy("lpf", max_wait=0)
    with pytest.raises(InvalidRequestError, match="priority"):
        SamplingParams(priority=1.5)


# -- starvation under adversarial arrivals -------------------------------------------------


@pytest.mark.parametrize("name", ["lpf", "mlfq", "priority"])
@pytest.mark.parametrize("max_wait", [None, 12.0])
def test_aging_bounds_the_wait_under_a_stream_of_short_requests(name, max_wait):
    """One long request, then a new short one every step for 200 steps, one seat."""
    lengths = {"long": 50.0}
    policy = {"lpf": lambda: LPFPolicy(max_wait=max_wait or 1e9, predictor=FixedPredictor(lengths)),
              "mlfq": lambda: MLFQPolicy(max_wait=max_wait or 1e9, base_quantum=1),
              "priority": lambda: PriorityPolicy(max_wait=max_wait)}[name]()
    s, clock = make_sched(policy, max_num_seqs=1)
    s.add(req("long", 50, priority=1))
    waits = []
    for i in range(200):
        rid = f"s{i}"
        lengths[rid] = 1.0
        s.add(req(rid, 1, arrival=clock.t))
        step(s, clock)
        long = s.requests.get("long")
        waits.append(long.waited(clock.t) if long else None)
    long_wait = max(w for w in waits if w is not None)
    if max_wait is None:
        # starved: at most mlfq's first quantum of one token before the stream took over
        assert "long" in s.requests and len(s.requests["long"].output_token_ids) <= 1
    else:
        # aged after max_wait seconds, admitted by the next step; 1 s per step here
        assert long_wait <= max_wait + 1.0
    run(s, clock)
    assert not s.has_unfinished()


# -- preempt + resume keeps every token exactly once ----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama"))


def _engine(tiny, **kw) -> LLMEngine:
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    kw.setdefault("kv_cache_memory", 400 * per_block)
    return LLMEngine(loaded=tiny, block_size=4, swap_space=200 * per_block, **kw)


def _run_staggered(eng: LLMEngine, prompts, params) -> dict[str, list[int]]:
    """Add one request per step (so later, better-ranked ones preempt earlier ones); check invariants."""
    outs: dict[str, list[int]] = {}
    pending = list(enumerate(zip(prompts, params)))
    while pending or eng.has_unfinished_requests():
        if pending:
            i, (p, sp) = pending.pop(0)
            eng.add_request(f"q{i}", p, sp)
        for o in eng.step():
            assert o.request_id not in outs
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        eng.kv.check_invariants()
    return outs


N_STAGGERED = 10
STAGGERED_PROMPTS = [random_ids(5 + 7 * (i % 5), TINY_VOCAB, seed=i) for i in range(N_STAGGERED)]
# later requests are shorter and more urgent: every policy preempts earlier, longer ones
STAGGERED_PARAMS = [SamplingParams(temperature=0, max_tokens=30 - 2 * i, ignore_eos=True, priority=N_STAGGERED - i)
                    for i in range(N_STAGGERED)]


@pytest.fixture(scope="module")
def staggered_reference(tiny):
    return _run_staggered(_engine(tiny, max_num_seqs=N_STAGGERED), STAGGERED_PROMPTS, STAGGERED_PARAMS)


@pytest.mark.parametrize("policy, mode", [("mlfq", "recompute"), ("mlfq", "swap"), ("lpf", "recompute"),
                                          ("priority", "recompute"), ("priority", "swap")])
def test_preempt_and_resume_loses_and_duplicates_no_token(tiny, staggered_reference, policy, mode):
    eng = _engine(tiny, max_num_seqs=3, scheduling_policy=policy, preemption_mode=mode,
                  scheduling_max_wait=1e9)
    if policy == "lpf":  # predictions that rank later (shorter) requests first
        eng.scheduler.policy.predictor = FixedPredictor({f"q{i}": 30 - 2 * i for i in range(N_STAGGERED)})
        eng.scheduler.policy.preempt_ratio = 1.0  # no hysteresis: preempt as often as possible
    outs = _run_staggered(eng, STAGGERED_PROMPTS, STAGGERED_PARAMS)
    assert outs == staggered_reference
    assert eng.scheduler.num_preemptions > 0
    if mode == "swap":
        assert eng.scheduler.num_swaps > 0
    kv = eng.kv
    assert kv.pool.num_used_blocks == 0 and not kv.swapped and not kv.req_blocks


def test_request_metrics_record_queueing_and_normalized_latency(tiny):
    eng = _engine(tiny, max_num_seqs=1)
    eng.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    eng.add_request("b", [4, 5, 6], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.metrics
    a, b = done["a"], done["b"]
    assert a.num_output_tokens == 6 and b.num_output_tokens == 2
    assert b.queue_time >= a.finish_time - b.arrival_time - 0.05  # b waited for a's seat
    assert b.first_scheduled_time >= a.finish_time
    assert b.normalized_latency == pytest.approx(b.e2e / 2)
    assert a.ttft <= a.e2e


def test_engine_rejects_an_unknown_policy(tiny):
    with pytest.raises(InvalidRequestError, match="scheduling_policy must be one of fcfs, priority, lpf, mlfq"):
        _engine(tiny, scheduling_policy="random")


# -- the length predictor ------------------------------------------------------------------


def test_online_predictor_cold_start_then_learns_prompt_words():
    p = OnlineLengthPredictor(min_observations=4, prior_tokens=100)
    short_words, long_words = [11, 12, 13], [21, 22, 23]

    def r(words, i, out=0):
        x = Request(f"r{i}", [1, 2, 3, *words, 100 + i % 7], SamplingParams(max_tokens=512), [], 4096)
        x.output_token_ids = [0] * out
        return x

    assert p.predict(r(short_words, 0)) == 100  # cold start: the prior, whatever the prompt
    for i in range(40):
        p.observe(r(short_words, i, out=3 + i % 3))
        p.observe(r(long_words, i, out=300 + 10 * (i % 5)))
    short, long = p.predict(r(short_words, 99)), p.predict(r(long_words, 99))
    assert 2 <= short <= 8 and 200 <= long <= 400


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


# -- where priority comes in ---------------------------------------------------------------


def test_generate_priority_argument_orders_admission(tiny):
    from kvserve import LLM

    llm = LLM.__new__(LLM)
    llm.engine, llm._next_id = _engine(tiny, max_num_seqs=1, scheduling_policy="priority"), 0
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate([[1, 2], [3, 4], [5, 6]], sp, use_tqdm=False, priority=[3, 1, 2])
    starts = [o.metrics.first_scheduled_time for o in outs]
    assert starts[1] < starts[2] < starts[0]
    with pytest.raises(InvalidRequestError, match="priorities"):
        llm.generate([[1, 2]], sp, use_tqdm=False, priority=[1, 2])


def test_openai_request_priority_field():
    from pydantic import ValidationError

    from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], priority=-2)
    assert chat.to_sampling_params(None).priority == -2
    assert CompletionRequest(prompt="hi").to_sampling_params(16).priority == 0
    with pytest.raises(ValidationError):  # the server answers 400 for a validation error
        CompletionRequest(prompt="hi", priority="high")
    assert SamplingParams(priority=4).clone(n=2).priority == 4


def test_cli_flag_reaches_the_engine_config():
    from kvserve.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "hi", "--scheduling-policy", "lpf", "--scheduling-max-wait", "5"])
    kw = engine_kwargs(args)
    assert kw["scheduling_policy"] == "lpf" and kw["scheduling_max_wait"] == 5.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--scheduling-policy", "random"])


# -- the simulator ---------------------------------------------------------------------------


def _sim(policy: str, work, replicas: int = 1, **kw):
    from kvserve.sim.cost_model import roofline
    from kvserve.sim.simulator import SimConfig, Simulator

    cost, _ = roofline("a100", "llama-8b")
    cfg = SimConfig(num_blocks=kw.pop("num_blocks", 400), block_size=16, max_num_seqs=kw.pop("max_num_seqs", 8),
                    scheduling_policy=policy, replicas=replicas, **kw)
    return Simulator(cfg, cost).run(work)


def test_simulator_is_deterministic_for_a_seed():
    from kvserve.sim.workload import synthetic

    for policy in ("fcfs", "lpf", "mlfq", "priority"):
        a = _sim(policy, synthetic(150, rate=20, seed=3, high_priority_frac=0.2))
        b = _sim(policy, synthetic(150, rate=20, seed=3, high_priority_frac=0.2))
        assert a.records == b.records and a.summary == b.summary and a.num_steps == b.num_steps
        assert len(a.records) == 150
    c = _sim("fcfs", synthetic(150, rate=20, seed=4))
    assert c.summary != a.summary


def test_simulator_runs_every_request_to_its_length():
    from kvserve.sim.workload import synthetic

    work = synthetic(120, rate=40, seed=1)
    for policy in ("fcfs", "lpf", "mlfq"):
        res = _sim(policy, work, num_blocks=120, preemption_mode="recompute")  # memory pressure: preemptions
        got = {r.request_id: r.num_output_tokens for r in res.records}
        assert got == {w.request_id: w.output_len for w in work}
        for r in res.records:
            assert r.arrival <= r.first_scheduled <= r.first_token <= r.finish
    assert _sim("fcfs", work, num_blocks=120).num_preemptions > 0


def test_simulated_lpf_beats_fcfs_on_heavy_tailed_lengths():
    from kvserve.sim.workload import synthetic

    work = synthetic(600, rate=30, seed=0)
    fcfs, lpf = _sim("fcfs", work).summary, _sim("lpf", work).summary
    assert lpf["latency_mean_s"] < 0.8 * fcfs["latency_mean_s"]
    assert abs(lpf["throughput_out_tok_s"] / fcfs["throughput_out_tok_s"] - 1) < 0.05


def test_replicas_share_the_load():
    from kvserve.sim.workload import synthetic

    work = synthetic(200, rate=40, seed=2)
    one, two = _sim("fcfs", work).summary, _sim("fcfs", work, replicas=2).summary
    assert two["latency_mean_s"] < one["latency_mean_s"]


def test_workload_jsonl_round_trip_and_bad_lines(tmp_path):
    from kvserve.sim.workload import WorkItem, load_jsonl, save_jsonl, synthetic

    work = synthetic(5, rate=1, seed=0) + [WorkItem(arrival=9.0, output_len=3, prompt_ids=[5, 6, 7], priority=2)]
    save_jsonl(work, tmp_path / "w.jsonl")
    back = load_jsonl(tmp_path / "w.jsonl")
    assert [(w.arrival, w.output_len, w.num_prompt_tokens, w.priority) for w in back] == \
        [(w.arrival, w.output_len, w.num_prompt_tokens, w.priority) for w in work]
    (tmp_path / "bad.jsonl").write_text('{"arrival": 0, "prompt_len": 4}\n')
    with pytest.raises(InvalidRequestError, match="bad.jsonl:1"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_cost_model_fit_recovers_a_linear_law(tmp_path):
    from kvserve.sim.cost_model import BatchFeatures, LinearCostModel, load_cost_model

    rng = __import__("random").Random(0)
    samples = []
    for _ in range(60):
        f = BatchFeatures(tokens=rng.randint(1, 500), seqs=rng.randint(1, 16), sampled=rng.randint(1, 16),
                          context=rng.randint(10, 5000), pairs=rng.randint(10, 100000))
        samples.append((f, 0.01 + 1e-4 * f.tokens + 2e-3 * f.seqs + 1e-6 * f.context))
    m = LinearCostModel.fit(samples)
    assert m.r2 > 0.999 and m.coef["tokens"] == pytest.approx(1e-4, rel=1e-3)
    m.save(tmp_path / "c.json")
    assert load_cost_model(tmp_path / "c.json").coef == m.coef
    with pytest.raises(InvalidRequestError, match="calibrate"):
        load_cost_model(tmp_path / "missing.json")
    slow = m.scaled(1.25)  # a machine 25% slower: every step 25% longer, the fit's record kept
    for f, _ in samples[:5]:
        assert slow.step_time(f) == pytest.approx(1.25 * m.step_time(f), rel=1e-12)
    assert slow.num_samples == m.num_samples and m.coef["tokens"] == pytest.approx(1e-4, rel=1e-3)


def test_calibration_records_real_steps(tiny):
    """The recorder keeps exactly the engine's steps that ran a batch while attached (the warm-up's two
    steps are not among them), with their own batch features, and the fit reports its error on them."""
    from kvserve.sim.calibrate import calibration_samples
    from kvserve.sim.cost_model import LinearCostModel, batch_features

    eng = _engine(tiny, max_num_seqs=4)
    seen = []
    eng.step_observers.append(lambda so, dt: seen.append(batch_features(so)) if so.scheduled else None)
    samples = calibration_samples(eng, max_seqs=4, prompt_lens=(8, 40), max_tokens=6)
    assert len(seen) > 20 and [f for f, _ in samples] == seen[2:]  # warm-up: a prefill and one decode
    assert all(0 < dt < 10 for _, dt in samples)
    # every calibration request: its prompt (8 or 40 tokens) is computed once, and each step samples once per sequence
    assert sum(f.tokens for f, _ in samples) == sum(f.sampled for f, _ in samples) + 3 * 4 * 0 + sum(
        f.tokens - f.sampled for f, _ in samples)
    assert sum(f.tokens - f.seqs for f, _ in samples) == (1 + 2 + 4) * ((8 - 1) + (40 - 1))
    m = LinearCostModel.fit(samples)
    pred = [m.step_time(f) for f, _ in samples]
    assert m.num_samples == len(samples) and m.mean_abs_rel_error == pytest.approx(
        sum(abs(p - t) / t for p, (_, t) in zip(pred, samples)) / len(samples), rel=1e-9)
    assert not eng.has_unfinished_requests() and eng.step_observers[1:] == []  # the recorder detached itself


def test_simulate_command(tmp_path, capsys):
    from kvserve.entrypoints.cli import main
    from kvserve.sim.workload import save_jsonl, synthetic

    save_jsonl(synthetic(40, rate=20, seed=0), tmp_path / "w.jsonl")
    argv = ["simulate", "--hardware", "a100", "--sim-model", "llama-8b", "--workload", str(tmp_path / "w.jsonl"),
            "--max-num-seqs", "4", "--policies", "fcfs,lpf", "--json"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["policy"] for x in lines] == ["fcfs", "lpf"] and all(x["requests"] == 40 for x in lines)
    assert main(argv) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines  # deterministic
    assert main(["simulate", "--cost-model", str(tmp_path / "none.json")]) == 2
    assert "calibrate" in capsys.readouterr().err
    assert main(["simulate", "--hardware", "tpu"]) == 2
    assert main(["simulate", "--hardware", "a100", "--workload", str(tmp_path / "nope.jsonl")]) == 2


# -- random workloads under every policy: block invariants, nothing lost, no livelock ----------


_op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 24), st.integers(0, 3), st.integers(1, 2)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=40), policy=st.sampled_from(["priority", "lpf", "mlfq"]),
       num_blocks=st.integers(6, 24), max_seqs=st.sampled_from([1, 2, 4]), budget=st.sampled_from([4, 16, 64]),
       mode=st.sampled_from(["recompute", "swap"]), caching=st.booleans())
def test_random_workloads_under_policies_keep_invariants(tiny, ops, policy, num_blocks, max_seqs, budget, mode,
                                                         caching):
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    eng = LLMEngine(loaded=tiny, kv_cache_memory=num_blocks * per_block, block_size=4, max_num_batched_tokens=budget,
                    max_num_seqs=max_seqs, preemption_mode=mode, swap_space=12 * per_block,
                    enable_prefix_caching=caching, scheduling_policy=policy)
    eng.runner = FakeRunner(eng)
    ids, finished = [], set()

    def step() -> None:
        for out in eng.step():
            if out.finished:
                assert out.request_id not in finished
                finished.add(out.request_id)
        eng.kv.check_invariants()

    for o in ops:
        if o[0] == "add":
            _, plen, max_tokens, prio, n = o
            rid = f"q{len(ids)}"
            try:
                eng.add_request(rid, list(range(1, plen + 1)),
                                SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, priority=prio))
                ids.append(rid)
            except InvalidRequestError:
                pass
        elif o[0] == "abort" and ids:
            eng.abort_request(ids[o[1] % len(ids)])
        else:
            for _ in range(o[1]):
                step()
    for _ in range(5000):
        if not eng.has_unfinished_requests():
            break
        step()
    assert not eng.has_unfinished_requests(), "livelock"
    assert finished == set(ids)
    assert eng.kv.pool.num_used_blocks == 0 and not eng.kv.swapped
