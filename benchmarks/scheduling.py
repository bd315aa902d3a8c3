"""Scheduling policies on the real engine, the priority TTFT check, and the simulator against both.

Workload: chat prompts to the default model whose natural answers are short (a number, a
word, yes/no) mixed with prompts that ask for long answers; greedy, ending at EOS, capped at
--cap tokens. Steps:

  0. capacity pass: every request at t=0 through an fcfs engine with --seats seats. It gives each
     prompt's natural answer length, the engine's capacity (output tokens/s while all seats are
     busy, divided by the mean answer length) and the measured steps the simulator is calibrated on;
  1. Poisson arrivals at --load x capacity (seeded), the same arrivals for every policy, run in
     real time through a fresh engine per policy (the lpf predictor starts cold and learns online).
     Engines run in two processes of --threads threads each (default 1: one core each), and two
     policies run side by side from the same start time: on a shared machine whose speed drifts
     by several percent over minutes, a policy run minutes after another would see another load;
     side by side, both see the same. Pass 0 and the calibration run in both processes at once too;
  2. priority: TTFT of high-priority requests sent into an engine saturated with low-priority long
     ones, against the TTFT of the same requests on an idle engine;
  3. the simulator, calibrated on pass 0 and the synthetic batches of `kvserve simulate --calibrate`
     (never on the runs it predicts), replays step 1's workload for each policy.

Prints a table per part and one JSON line last. Usage:
    python benchmarks/scheduling.py [--num-requests 300] [--seats 4] [--load 0.9] [--cap 512]
                                    [--policies fcfs,lpf] [--seed 0] [--no-priority]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import deque

import numpy as np
import torch

SHORT = [
    "What is {a} plus {b}? Reply with only the number.",
    "What is {a} times {b}? Answer with just the number.",
    "Is {a} greater than {b}? Answer yes or no.",
    "Is {x} a color? Answer only yes or no.",
    "Name the capital of {c} in one word.",
    "What is the opposite of {w}? One word.",
]
LONG = [
    "Write a detailed essay about {t}.",
    "Explain in detail how {t} works, step by step.",
    "Write a long story about {t}.",
    "Describe {t} in depth, with many examples.",
]
COLORS = ["red", "blue", "a table", "green", "a river", "yellow", "a dog", "purple"]
COUNTRIES = ["France", "Spain", "Italy", "Japan", "Germany", "Egypt", "Canada", "Peru"]
WORDS = ["hot", "up", "big", "fast", "happy", "light", "early", "open"]
TOPICS = ["the history of the Roman Empire", "a car engine", "a dragon who learns to cook", "the water cycle",
          "learning to play the guitar", "the causes of World War I", "photosynthesis", "the internet",
          "a lighthouse keeper", "the French Revolution", "a steam locomotive", "volcanoes"]


def make_prompts(n: int, long_frac: float, seed: int) -> list[tuple[str, str]]:
    """(kind, text) pairs; every prompt text is distinct."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        if rng.random() < long_frac:
            text, kind = LONG[rng.integers(len(LONG))].format(t=TOPICS[rng.integers(len(TOPICS))]), "long"
        else:
            tpl = SHORT[rng.integers(len(SHORT))]
            text = tpl.format(a=int(rng.integers(2, 60)), b=int(rng.integers(2, 60)), x=COLORS[rng.integers(8)],
                              c=COUNTRIES[rng.integers(8)], w=WORDS[rng.integers(8)])
            kind = "short"
        if text not in seen:
            seen.add(text)
            out.append((kind, text))
    return out


def new_engine(lm, args, policy: str):
    from kvserve.engine.llm_engine import LLMEngine

    return LLMEngine(loaded=lm, scheduling_policy=policy, max_num_seqs=args.seats, kv_cache_memory=args.kv_cache_memory,
                     max_num_batched_tokens=args.max_num_batched_tokens, preemption_mode=args.preemption_mode,
                     swap_space=args.swap_space, scheduling_max_wait=args.max_wait)


def engine_shape(eng) -> dict:
    """What the simulator needs to know about an engine's KV cache and limits."""
    return {"num_blocks": eng.kv.num_blocks, "block_size": eng.kv.block_size, "max_model_len": eng.max_model_len,
            "num_host_blocks": 0 if eng.kv.host_pool is None else eng.kv.host_pool.num_blocks}


def run_open_loop(eng, work, params_of, t0: float | None = None) -> tuple[list, dict]:
    """Feed `work` (WorkItems, arrival seconds from t0, default now) in real time; returns records and outputs."""
    from kvserve.sim.simulator import RequestRecord

    pending = deque(sorted(work, key=lambda w: w.arrival))
    reqs, outs = {}, {}
    t0 = time.time() + 0.01 if t0 is None else t0
    time.sleep(max(0.0, t0 - time.time()))
    while pending or eng.has_unfinished_requests():
        now = time.time()
        while pending and t0 + pending[0].arrival <= now:
            w = pending.popleft()
            eng.add_request(w.request_id, w.prompt_ids, params_of(w), arrival_time=t0 + w.arrival)
            reqs[w.request_id] = eng.output_processor.parents[w.request_id].children[0]
        if eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
        elif pending:
            time.sleep(max(0.0, t0 + pending[0].arrival - time.time()))
    records = []
    for rid, o in outs.items():
        m, r = o.metrics, reqs[rid]
        records.append(RequestRecord(rid, m.arrival_time - t0, m.first_scheduled_time - t0, m.first_token_time - t0,
                                     m.finish_time - t0, m.queue_time, len(o.prompt_token_ids), m.num_output_tokens,
                                     m.num_preemptions, r.predicted_output_tokens))
    return sorted(records, key=lambda x: x.arrival), outs


def worker(conn, args) -> None:
    """One engine process on `args.threads` threads: loads the model, then runs what it is sent.

    The policies run side by side in two such processes, one core each, on the same arrivals from
    the same start time, so whatever else the shared machine does slows both alike.
    """
    from kvserve import SamplingParams
    from kvserve.loader import load_model
    from kvserve.sim.calibrate import StepRecorder, calibration_samples

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, quantization=args.quantization)
    params = lambda w: SamplingParams(temperature=0, max_tokens=args.cap, priority=w.priority)  # noqa: E731
    conn.send("ready")
    while True:
        cmd, payload = conn.recv()
        if cmd == "stop":
            return
        if cmd == "run":  # (policy, work, t0) -> (records, step samples, engine shape)
            policy, work, t0 = payload
            eng = new_engine(lm, args, policy)
            eng.add_request("warmup", work[0].prompt_ids, SamplingParams(temperature=0, max_tokens=4))
            while eng.has_unfinished_requests():
                eng.step()
            rec = StepRecorder(eng)
            with rec.attached():
                recs, _ = run_open_loop(eng, work, params, t0)
            conn.send((recs, rec.samples, engine_shape(eng)))
            del eng, rec
            gc.collect()  # engines hold reference cycles, and a KV cache plus swap space of a GiB or more
        elif cmd == "calibrate":  # (seed, t0) -> the synthetic batches' measured steps, on a throwaway engine
            seed, t0 = payload
            eng = new_engine(lm, args, "fcfs")
            time.sleep(max(0.0, t0 - time.time()))
            conn.send(calibration_samples(eng, seed=seed, max_seqs=args.seats))
            del eng
            gc.collect()
        elif cmd == "priority":
            conn.send(priority_check(lm, args, *payload))


class Workers:
    """Two engine processes driven in lock step: `both` sends each its command and waits for both."""

    def __init__(self, args, n: int = 2) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(b, args), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)
        for c in self.conns:
            assert c.recv() == "ready"

    def both(self, cmds: list[tuple]) -> list:
        for c, cmd in zip(self.conns, cmds):
            c.send(cmd)
        return [c.recv() for c, _ in zip(self.conns, cmds)]

    def close(self) -> None:
        for c in self.conns:
            c.send(("stop", None))
        for p in self.procs:
            p.join(30)


def fmt_row(name: str, s: dict) -> str:
    return (f"{name:10} {s['throughput_out_tok_s']:7.1f} {s['latency_mean_s']:9.2f} {s['latency_p99_s']:8.2f} "
            f"{s['ttft_mean_s']:9.2f} {s['normalized_latency_mean_s']:9.3f} {s['worst_wait_s']:10.2f} "
            f"{s['preempted_requests']:9d}")


HEADER = (f"{'policy':10} {'tok/s':>7} {'lat mean':>9} {'lat p99':>8} {'ttft mean':>9} {'norm lat':>9} "
          f"{'worst wait':>10} {'preempted':>9}")


def priority_check(lm, args, prompt_ids: list[list[int]], long_ids: list[list[int]]) -> dict:
    """TTFT of high-priority short requests: idle engine vs one saturated by low-priority long requests."""
    from kvserve import SamplingParams

    hi = SamplingParams(temperature=0, max_tokens=8, priority=0)
    idle = []
    eng = new_engine(lm, args, "priority")
    for i, ids in enumerate(prompt_ids):
        eng.add_request(f"idle{i}", ids, hi)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    idle.append(o.metrics.ttft)
    del eng
    gc.collect()
    eng = new_engine(lm, args, "priority")
    lo = SamplingParams(temperature=0, max_tokens=args.cap, ignore_eos=True, priority=1)
    for i in range(2 * args.seats):
        eng.add_request(f"bg{i}", long_ids[i % len(long_ids)], lo)
    for _ in range(3):
        eng.step()  # all seats busy, a queue behind them
    busy = (len(eng.scheduler.running), len(eng.scheduler.waiting))
    sat, left = [], list(enumerate(prompt_ids))
    steps = 0
    while left or any(g.startswith("hi") for g in eng.output_processor.parents):
        if left and steps % 4 == 0:  # one high-priority request every 4 steps, arriving between steps
            i, ids = left.pop(0)
            eng.add_request(f"hi{i}", ids, hi)
        for o in eng.step():
            if o.finished and o.request_id.startswith("hi"):
                sat.append(o.metrics.ttft)
        steps += 1
    for gid in list(eng.output_processor.parents):
        eng.abort_request(gid)
    while eng.has_unfinished_requests():
        eng.step()
    del eng
    gc.collect()
    return {"idle_ttft_mean_s": sum(idle) / len(idle), "saturated_ttft_mean_s": sum(sat) / len(sat),
            "ttft_ratio": (sum(sat) / len(sat)) / (sum(idle) / len(idle)), "saturated_running_waiting": busy,
            "n": len(sat)}


def sim_sweep(cost, cfg_kwargs: dict, work, capacity: float, loads: tuple[float, ...], n: int, seed: int,
              policies: tuple[str, ...] = ("fcfs", "lpf", "mlfq")) -> dict:
    """What-if at a scale too slow to run here: n requests whose answer lengths are resampled from the
    measured ones per prompt kind, with stand-in prompts that share only a kind marker (so the lpf
    predictor can learn the kind, never an exact prompt), Poisson at each load x capacity (the same
    requests and the same arrival pattern at every load, stretched in time)."""
    from kvserve.sim.simulator import SimConfig, Simulator
    from kvserve.sim.workload import WorkItem

    rng = np.random.default_rng(seed + 2)
    kinds = [w.kind for w in work]
    by_kind = {k: [w.output_len for w in work if w.kind == k] for k in sorted(set(kinds))}
    plens = [w.num_prompt_tokens for w in work]
    # one sample of requests and of unit-rate gaps for every load (only the time scale changes),
    # so the loads differ by load alone, not by which long answers the draw happened to hold
    drawn = []
    for _ in range(n):
        k = kinds[rng.integers(len(kinds))]
        drawn.append((k, int(rng.choice(by_kind[k])), int(rng.choice(plens))))
    unit = np.cumsum(rng.exponential(1.0, size=n))
    out = {}
    for load in loads:
        arrivals = unit / (load * capacity)
        items = [WorkItem(float(a), out_len, prompt_len=plen, request_id=f"s{i}", kind=k, max_tokens=work[0].max_tokens)
                 for i, (a, (k, out_len, plen)) in enumerate(zip(arrivals, drawn))]
        res = {p: Simulator(SimConfig(scheduling_policy=p, **cfg_kwargs), cost).run(items).summary for p in policies}
        out[load] = {p: {k: round(res[p][k], 3) for k in ("latency_mean_s", "latency_p99_s", "ttft_mean_s",
                                                           "normalized_latency_mean_s", "worst_wait_s",
                                                           "throughput_out_tok_s")} for p in policies}
        out[load]["lpf_mean_latency_cut"] = round(1 - res["lpf"]["latency_mean_s"] / res["fcfs"]["latency_mean_s"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="auto", help="kvserve --quantization (auto: int4 for the default GGUF)")
    ap.add_argument("--num-requests", type=int, default=300,
                    help="a few hundred: shorter runs rarely reach the queueing the policies differ on")
    ap.add_argument("--long-frac", type=float, default=0.15)
    ap.add_argument("--seats", type=int, default=4, help="max_num_seqs: the engine's concurrency")
    ap.add_argument("--load", type=float, default=0.9, help="arrival rate as a share of measured capacity")
    ap.add_argument("--cap", type=int, default=512, help="max_tokens")
    ap.add_argument("--policies", default="fcfs,lpf")
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="aging bound (s) for lpf/mlfq; on this CPU a long answer alone takes over a minute, "
                         "and an aging bound below the service time turns lpf into fcfs under load")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--preemption-mode", default="swap", help="swap: on CPU a preemption is a memcpy")
    ap.add_argument("--swap-space", default="1GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per engine process (two processes run side by side; 1 each fills 2 cores)")
    ap.add_argument("--save-workload", default=None, help="write step 1's workload as JSONL (for kvserve simulate)")
    ap.add_argument("--save-steps", default=None,
                    help="write every measured step (pass 0 and each policy's run) as JSONL: batch features, seconds")
    ap.add_argument("--no-priority", action="store_true")
    ap.add_argument("--no-sim", action="store_true")
    ap.add_argument("--sweep-requests", type=int, default=400, help="simulated what-if size (0: skip)")
    args = ap.parse_args()

    from kvserve.engine.policy import kendall_tau
    from kvserve.loader import load_model
    from kvserve.sim.cost_model import LinearCostModel
    from kvserve.sim.simulator import SimConfig, Simulator, summarize
    from kvserve.sim.workload import WorkItem

    t_start = time.time()
    torch.set_num_threads(1)
    tok = load_model(args.model, dtype=args.dtype, quantization="none").tokenizer
    prompts = make_prompts(args.num_requests, args.long_frac, args.seed)
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True) for _, t in prompts]
    workers = Workers(args)
    start = lambda: time.time() + 0.5  # noqa: E731  a common start, once both have the command

    # 0. capacity pass: all at t=0, in both processes at once (the machine as busy as in step 1)
    work0 = [WorkItem(0.0, 0, prompt_ids=p, request_id=f"r{i}", kind=k, max_tokens=args.cap)
             for i, (p, (k, _)) in enumerate(zip(ids, prompts))]
    t0 = start()
    pass0_runs = workers.both([("run", ("fcfs", work0, t0))] * 2)
    recs0, samples0, shape = pass0_runs[0]
    out_len = {r.request_id: r.num_output_tokens for r in recs0}
    rates = []
    for _, samples, _ in pass0_runs:
        full = [(f, t) for f, t in samples if f.seqs == args.seats]
        rates.append(sum(f.sampled for f, _ in full) / sum(t for _, t in full) if full else float("nan"))
    tok_s_full = sum(rates) / len(rates)
    mean_len = sum(out_len.values()) / len(out_len)
    capacity = tok_s_full / mean_len  # req/s one engine sustains with every seat busy
    pass0 = summarize(recs0)
    # pass 0 keeps every seat busy, so it has few steps with 1..seats-1 sequences: add the
    # synthetic batches of `kvserve simulate --calibrate` (1, 2, 4.. sequences; a few seconds)
    t0 = start()
    calib = [x for c in workers.both([("calibrate", (args.seed, t0))] * 2) for x in c]
    fit_samples = [x for _, samples, _ in pass0_runs for x in samples] + calib
    cost = LinearCostModel.fit(fit_samples, source="scheduling benchmark pass 0 + kvserve simulate --calibrate")
    lens = sorted(out_len.values())
    print(f"pass 0 (two engines side by side, {args.threads} thread(s) each): {len(recs0)} requests in "
          f"{pass0['duration_s']:.1f} s; answer lengths min {lens[0]} median {lens[len(lens) // 2]} max {lens[-1]} "
          f"mean {mean_len:.1f}; short (<=16 tok) {sum(x <= 16 for x in lens)}, long (>=128) {sum(x >= 128 for x in lens)}")
    print(f"capacity: {tok_s_full:.1f} output tok/s with {args.seats} seats busy (engines: "
          f"{', '.join(f'{r:.1f}' for r in rates)}) = {capacity:.3f} req/s "
          f"(closed-loop pass incl. tail: {pass0['throughput_req_s']:.3f} req/s)")
    print(cost.describe(), flush=True)

    # 1. open loop at load x capacity, same arrivals for every policy; two policies at a time, side by side
    rate = args.load * capacity
    rng = np.random.default_rng(args.seed + 1)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(ids)))
    order = rng.permutation(len(ids))
    work = [WorkItem(float(a), out_len[f"r{j}"], prompt_ids=ids[j], request_id=f"r{j}", kind=prompts[j][0],
                     max_tokens=args.cap) for a, j in zip(arrivals, order)]
    if args.save_workload:
        from kvserve.sim.workload import save_jsonl

        save_jsonl(work, args.save_workload)
    kind = {w.request_id: w.kind for w in work}
    real, taus, mismatched, by_kind = {}, {}, {}, {}
    print(f"\nreal engine, {len(work)} Poisson arrivals at {rate:.3f} req/s ({args.load:.0%} of capacity), "
          f"{args.seats} seats, preemption {args.preemption_mode}; the policies run two at a time, side by side")
    print(HEADER)
    step_check, drift = {}, {}
    names = args.policies.split(",")
    for i in range(0, len(names), 2):
        pair = names[i : i + 2]
        t0 = start()
        checks = workers.both([("calibrate", (args.seed + 7, t0))] * len(pair))
        t0 = start()
        runs = workers.both([("run", (name, work, t0)) for name in pair])
        # the machine's speed now against when the cost model was fitted, from both processes' checks
        # (the pair runs at the same time, so one factor for both)
        check = [x for c in checks for x in c]
        speed = sum(t for _, t in check) / sum(cost.step_time(f) for f, _ in check)
        for name, (recs, samples, _) in zip(pair, runs):
            # and the model against the run's own steps (reported, never fitted): is a simulator
            # error the step times' or the queueing's?
            drift[name] = speed
            step_check[name] = (sum(t for _, t in samples) / sum(cost.step_time(f) for f, _ in samples),
                                len(samples), samples)
            real[name] = summarize(recs)
            mismatched[name] = sum(r.num_output_tokens != out_len[r.request_id] for r in recs)
            by_kind[name] = {k: round(float(np.mean([r.latency for r in recs if kind[r.request_id] == k])), 3)
                             for k in ("short", "long") if any(kind[r.request_id] == k for r in recs)}
            if name == "lpf":
                taus[name] = kendall_tau([r.predicted_output_tokens for r in recs], [r.num_output_tokens for r in recs])
                late = recs[len(recs) // 2:]  # after the predictor has seen some finished requests
                taus["lpf_second_half"] = kendall_tau([r.predicted_output_tokens for r in late],
                                                      [r.num_output_tokens for r in late])
            print(fmt_row(name, real[name]), flush=True)
    if args.save_steps:
        from dataclasses import asdict

        with open(args.save_steps, "w") as fh:
            for run_name, samples in [("pass0", samples0), ("calibrate", calib),
                                      *((k, v[2]) for k, v in step_check.items())]:
                for f, t in samples:
                    fh.write(json.dumps({"run": run_name, **asdict(f), "seconds": t}) + "\n")
    print("measured / modelled step time on each run's own steps (a check, not used): "
          + ", ".join(f"{k} {v[0]:.3f} ({v[1]} steps)" for k, v in step_check.items())
          + "; speed check before each run (measured / model): "
          + ", ".join(f"{k} {v:.3f}" for k, v in drift.items()))
    if any(mismatched.values()):
        print(f"note: answers whose length differed from pass 0 (batch-dependent numerics): {mismatched}")
    result: dict = {"workload": f"{len(work)} chat requests ({args.long_frac:.0%} asking for long answers), greedy, "
                                f"EOS or cap {args.cap}, Poisson at {args.load:.0%} of capacity, {args.seats} seats, "
                                f"{args.dtype}, {args.quantization} weights, two engines side by side with "
                                f"{args.threads} thread(s) each",
                    "capacity_req_s": round(capacity, 4), "rate_req_s": round(rate, 4),
                    "real": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in real.items()},
                    "latency_mean_by_prompt_kind_s": by_kind,
                    "measured_vs_model_steps": {k: round(v[0], 4) for k, v in step_check.items()},
                    "speed_check": {k: round(v, 4) for k, v in drift.items()}}
    if "fcfs" in real and "lpf" in real:
        f, lp = real["fcfs"], real["lpf"]
        result["lpf_vs_fcfs"] = {
            "mean_latency_cut": round(1 - lp["latency_mean_s"] / f["latency_mean_s"], 4),
            "p99_latency_ratio": round(lp["latency_p99_s"] / f["latency_p99_s"], 4),
            "throughput_ratio": round(lp["throughput_out_tok_s"] / f["throughput_out_tok_s"], 4),
            "lpf_worst_wait_s": round(lp["worst_wait_s"], 2),
        }
        result["kendall_tau"] = {k: round(v, 4) for k, v in taus.items()}
        print(f"lpf vs fcfs: mean latency {-100 * result['lpf_vs_fcfs']['mean_latency_cut']:+.1f}%, "
              f"throughput x{result['lpf_vs_fcfs']['throughput_ratio']:.3f}, lpf worst wait {lp['worst_wait_s']:.1f} s; "
              f"predictor Kendall tau {taus.get('lpf', float('nan')):.3f} "
              f"(second half {taus.get('lpf_second_half', float('nan')):.3f})")

    # 2. priority (one engine; the other process idles)
    if not args.no_priority:
        short_ids = [p for p, (k, _) in zip(ids, prompts) if k == "short"][:4]
        long_ids = [p for p, (k, _) in zip(ids, prompts) if k == "long"] or ids
        pr = workers.both([("priority", (short_ids, long_ids))])[0]
        result["priority"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in pr.items()}
        print(f"\npriority: high-priority TTFT idle {pr['idle_ttft_mean_s']:.3f} s, into a saturated engine "
              f"(running, waiting = {pr['saturated_running_waiting']}) {pr['saturated_ttft_mean_s']:.3f} s: "
              f"ratio {pr['ttft_ratio']:.2f} (target <= 2)", flush=True)
    workers.close()

    # 3. simulator: the cost model fitted on pass 0 and the synthetic batches (never on the runs it
    # predicts). Pass 0 ran under the same conditions as the runs (both processes busy); scaling by
    # the few-second speed check before a run is shown beside it: that check is itself noisy by a
    # few percent, which queueing at 90% load amplifies several times.
    sim_kwargs = dict(num_blocks=shape["num_blocks"], block_size=shape["block_size"], max_num_seqs=args.seats,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=shape["max_model_len"],
                      preemption_mode=args.preemption_mode, num_host_blocks=shape["num_host_blocks"],
                      scheduling_max_wait=args.max_wait)
    if not args.no_sim:
        print("\nsimulator on the same workload (cost model fitted on pass 0 + synthetic batches; in brackets, "
              "the errors with its step times scaled by the speed check before the run)")
        print(HEADER + f" {'speed':>6} {'lat err':>8} {'tput err':>8}")
        result["sim"] = {}
        for name in real:
            row = {"speed_factor": round(drift[name], 4)}
            for tag, model in (("", cost), ("_speed_scaled", cost.scaled(drift[name]))):
                s = Simulator(SimConfig(scheduling_policy=name, **sim_kwargs), model).run(work).summary
                row[f"latency_mean_s{tag}"] = round(s["latency_mean_s"], 4)
                row[f"throughput_out_tok_s{tag}"] = round(s["throughput_out_tok_s"], 2)
                row[f"latency_error{tag}"] = round(s["latency_mean_s"] / real[name]["latency_mean_s"] - 1, 4)
                row[f"throughput_error{tag}"] = round(s["throughput_out_tok_s"] / real[name]["throughput_out_tok_s"] - 1, 4)
                if not tag:
                    shown = s
            result["sim"][name] = row
            print(fmt_row(name, shown) + f" {row['speed_factor']:6.3f} {100 * row['latency_error']:+7.1f}% "
                  f"{100 * row['throughput_error']:+7.1f}%  ({100 * row['latency_error_speed_scaled']:+.1f}%, "
                  f"{100 * row['throughput_error_speed_scaled']:+.1f}%)")
    # 4. what-if at scale, on the same calibration
    if not args.no_sim and args.sweep_requests:
        loads = (0.8, 0.9, 0.95)
        sweep = sim_sweep(cost, sim_kwargs, work, capacity, loads, args.sweep_requests, args.seed)
        result["sim_sweep"] = {str(k): v for k, v in sweep.items()}
        print(f"\nsimulated what-if: {args.sweep_requests} requests, lengths resampled per prompt kind")
        print(f"{'load':>5} {'fcfs lat':>9} {'lpf lat':>8} {'mlfq lat':>9} {'lpf cut':>8} {'fcfs norm':>9} "
              f"{'lpf norm':>9} {'lpf worst wait':>14}")
        for load, v in sweep.items():
            print(f"{load:5.2f} {v['fcfs']['latency_mean_s']:9.2f} {v['lpf']['latency_mean_s']:8.2f} "
                  f"{v['mlfq']['latency_mean_s']:9.2f} {100 * v['lpf_mean_latency_cut']:7.1f}% "
                  f"{v['fcfs']['normalized_latency_mean_s']:9.3f} {v['lpf']['normalized_latency_mean_s']:9.3f} "
                  f"{v['lpf']['worst_wait_s']:14.2f}")
    result["bench_seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
