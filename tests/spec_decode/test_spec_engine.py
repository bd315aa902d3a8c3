"""Speculative decoding in the engine on tiny random models: greedy outputs identical to no speculation
(batched, mixed, chunked, prefix-cached, preempted, n > 1, aborted), stops inside accepted runs, KV
invariants after every step, stats and /metrics, and a hypothesis random workload on a fake runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import TINY_VOCAB, FakeRunner, make_tiny_hf, random_ids
from kvserve import SamplingParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.request import Request
from kvserve.engine.scheduler import Scheduler
from kvserve.errors import InvalidRequestError
from kvserve.kernels import cpu as native
from kvserve.loader import load_model
from kvserve.spec_decode.adaptive import StepTimeModel

# fixed draft lengths: the verify path runs on every draft the proposer finds (adaptive lengths: test_spec_adaptive.py)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1, "adaptive": False}
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path)


@pytest.fixture(scope="module")
def tiny_int8(tiny_path):
    """The same model on the fused native decode path (int8 weights), where the machine has it."""
    if not native.available():
        pytest.skip("no native CPU kernels here")
    return load_model(tiny_path, quantization="int8")


class OracleProposer:
    """Drafts the reference greedy continuation of each prompt, corrupting one draft token every
    `corrupt_every`-th proposal: long accepted runs and rejections both happen."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]], k: int = 4, corrupt_every: int = 3) -> None:
        self.refs, self.k, self.corrupt_every, self.calls = refs, k, corrupt_every, 0

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        self.calls += 1
        prompt = max((p for p in self.refs if tuple(token_ids[: len(p)]) == p), key=len, default=None)
        if prompt is None:
            return []
        done = len(token_ids) - len(prompt)
        draft = list(self.refs[prompt][done : done + min(k, self.k)])
        if draft and self.corrupt_every and self.calls % self.corrupt_every == 0:
            j = self.calls % len(draft)
            draft[j] = (draft[j] + 1) % TINY_VOCAB
        return draft


def make_engine(loaded, spec=None, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "4MiB")
    return LLMEngine(loaded=loaded, speculative_config=spec, **kw)


def run(eng: LLMEngine, prompts, params, abort_after: dict[int, int] | None = None) -> dict[str, object]:
    """Every prompt to completion; after every step the KV invariants hold (a draft model's too, and it
    keeps state only for running requests); at the end no block of either cache is in use."""
    from kvserve.spec_decode.draft_model import DraftModelProposer

    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    draft = eng.scheduler.proposer if isinstance(eng.scheduler.proposer, DraftModelProposer) else None
    done: dict[str, object] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        for i, at in (abort_after or {}).items():
            if steps == at:
                eng.abort_request(f"r{i}")
        eng.kv.check_invariants()
        if draft is not None:
            draft.kv.check_invariants()
            assert set(draft.states) <= {r.request_id for r in eng.scheduler.running}
    assert eng.kv.pool.num_used_blocks == 0 and not eng.kv.req_blocks
    if draft is not None:
        assert draft.kv.pool.num_used_blocks == 0 and not draft.states and not draft.kv.req_blocks
    return done


def tokens(done, n: int) -> list[list[int]]:
    return [done[f"r{i}"].outputs[0].token_ids for i in range(n)]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    out = []
    for i, n in enumerate(rng.integers(2, 40, size=24)):
        base = random_ids(int(n), TINY_VOCAB, seed=100 + i)
        out.append(base + base[: int(n) // 2] if i % 3 == 0 else base)  # some repeat themselves (n-gram hits)
    out.append(out[1] + [5, 6, 7])  # shares a cached prefix with prompt 1
    return out


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return tokens(run(make_engine(tiny), prompts, GREEDY), len(prompts))


def oracle(prompts, reference, **kw) -> OracleProposer:
    return OracleProposer({tuple(p): r for p, r in zip(prompts, reference)}, **kw)


def with_proposer(eng: LLMEngine, proposer) -> LLMEngine:
    eng.scheduler.proposer = proposer
    return eng


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 16, "block_size": 4},
                                {"enable_prefix_caching": False, "block_size": 2}, {"max_num_seqs": 3}],
                         ids=["default", "chunked", "no-prefix-cache", "few-seqs"])
def test_oracle_drafts_give_identical_greedy_tokens(tiny, prompts, reference, kw):
    eng = with_proposer(make_engine(tiny, NGRAM, **kw), oracle(prompts, reference))
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    st_ = eng.stats()
    # drafts were long and mostly right, and some were rejected: both paths ran
    assert st_["spec_decode_num_drafts"] > 20
    assert 0.3 < st_["spec_decode_acceptance_rate"] < 1.0
    assert st_["spec_decode_num_accepted_tokens"] < st_["spec_decode_num_draft_tokens"]


def test_ngram_gives_identical_greedy_tokens_and_prefix_cache_hits(tiny, prompts, reference):
    eng = make_engine(tiny, NGRAM, block_size=4)
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    hits = eng.kv.prefix_hits
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference  # again, from the prefix cache
    assert eng.kv.prefix_hits > hits
    assert eng.stats()["spec_decode_num_drafts"] > 0


def test_native_fused_path_is_exact_under_speculation(tiny_int8, prompts):
    want = tokens(run(make_engine(tiny_int8), prompts, GREEDY), len(prompts))
    eng = with_proposer(make_engine(tiny_int8, NGRAM), oracle(prompts, want))
    assert eng.runner.native is not None  # the fused step really runs
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == want
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 50


def test_preemption_with_speculation_keeps_outputs(tiny, prompts, reference):
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    for mode in ("recompute", "swap"):
        eng = with_proposer(make_engine(tiny, NGRAM, kv_cache_memory=24 * per_block, block_size=4,
                                        preemption_mode=mode, swap_space=30 * per_block),
                            oracle(prompts, reference))
        assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
        assert eng.scheduler.num_preemptions > 0, mode


def test_mixed_with_requests_that_do_not_speculate(tiny, prompts, reference):
    """Greedy and seeded sampled requests speculate beside penalised and min_tokens ones; all keep the
    tokens they get without speculation, and the penalised and min_tokens ones are never given a draft."""
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    others = [sampled, SamplingParams(temperature=0, presence_penalty=0.5, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=24, max_tokens=24)]
    params = [GREEDY if i % 2 == 0 else others[i // 2 % 3] for i in range(len(prompts))]
    want = tokens(run(make_engine(tiny), prompts, params), len(prompts))
    eng = with_proposer(make_engine(tiny, NGRAM), oracle(prompts, reference))
    drafted: set[str] = set()
    schedule = eng.scheduler.schedule

    def spy():
        so = schedule()
        drafted.update(s.request.request_id for s in so.scheduled if s.spec_token_ids)
        return so

    eng.scheduler.schedule = spy
    done = run(eng, prompts, params)
    got = tokens(done, len(prompts))
    assert got == want
    for i in range(0, len(prompts), 2):
        assert got[i] == reference[i]
    assert all(len(t) == 24 for t in got)
    speculating = {f"r{i}" for i, p in enumerate(params) if p is GREEDY or p is sampled}
    assert drafted <= speculating and any(params[int(rid[1:])] is sampled for rid in drafted)
    assert any(params[int(rid[1:])] is GREEDY for rid in drafted)
    for sp in others[1:]:
        assert not Scheduler.can_speculate(Request("x", [1, 2], sp, [], 100))
    assert Scheduler.can_speculate(Request("x", [1, 2], sampled, [], 100))
    assert Scheduler.can_speculate(Request("x", [1, 2], GREEDY, [], 100))


def test_n_greater_than_one_and_abort(tiny, prompts, reference):
    eng = with_proposer(make_engine(tiny, NGRAM, block_size=4), oracle(prompts, reference))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2)
    done = run(eng, prompts[:8], params, abort_after={3: 2, 5: 4})
    for i in (0, 1, 2, 4, 6, 7):
        assert [c.token_ids for c in done[f"r{i}"].outputs] == [reference[i]] * 2
    for i in (3, 5):
        assert done[f"r{i}"].outputs[0].finish_reason == "abort"


def test_max_tokens_and_stops_inside_an_accepted_run(tiny, tiny_path, prompts, reference):
    """Drafts that are always right (k=6): every stop lands inside an accepted run and cuts it where a
    step-by-step decode stops, with the same text, finish reason and logprobs."""
    tok = tiny.tokenizer
    cases, ps = [], []
    for i in range(8):
        ref = reference[i]
        text = tok.decode(ref[:12])
        cases.append(SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True))
        cases.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[5 + i % 4]], logprobs=2))
        ps += [prompts[i]] * 2
        if len(text) > 8:
            cases.append(SamplingParams(temperature=0, max_tokens=24, stop=[text[6:8]], ignore_eos=True))
            ps.append(prompts[i])
    want = run(make_engine(tiny), ps, cases)
    eng = with_proposer(make_engine(tiny, {"method": "ngram", "num_speculative_tokens": 6, "adaptive": False}),
                        oracle(prompts, reference, k=6, corrupt_every=0))
    got = run(eng, ps, cases)
    assert eng.stats()["spec_decode_acceptance_rate"] == 1.0
    for i in range(len(cases)):
        a, b = want[f"r{i}"].outputs[0], got[f"r{i}"].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason,
                                                                         a.stop_reason), cases[i]
        if a.logprobs:
            assert len(b.logprobs) == len(a.logprobs) == len(a.token_ids)
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert any(want[f"r{i}"].outputs[0].finish_reason == "stop" for i in range(len(cases)))


def test_llm_option_takes_a_dict_or_json(tiny_path, prompts, reference):
    from kvserve import LLM

    for spec in (NGRAM, '{"method": "ngram", "num_speculative_tokens": 2}'):
        with LLM(str(tiny_path), speculative_config=spec, kv_cache_memory="4MiB") as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:6]], GREEDY, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == reference[:6]
            assert llm.engine.scheduler.proposer is not None
    with pytest.raises(InvalidRequestError, match="speculative_config"):
        LLM(str(tiny_path), speculative_config={"method": "ngram", "num_speculative_tokens": -1})


def test_stats_and_metrics_names(tiny, prompts, reference):
    from kvserve.entrypoints.openai.metrics import Metrics

    eng = with_proposer(make_engine(tiny, NGRAM), oracle(prompts, reference))
    m = Metrics()
    m.update_gauges(eng.stats())
    run(eng, prompts[:6], GREEDY)
    st_ = eng.stats()
    m.update_gauges(st_)
    m.update_gauges(st_)  # the same snapshot twice adds nothing
    text = m.render()[0].decode()

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    assert value("kvserve:spec_decode_num_draft_tokens_total") == st_["spec_decode_num_draft_tokens"] > 0
    assert value("kvserve:spec_decode_num_accepted_tokens_total") == st_["spec_decode_num_accepted_tokens"] > 0
    assert value("kvserve:spec_decode_num_drafts_total") == st_["spec_decode_num_drafts"]
    rate = st_["spec_decode_num_accepted_tokens"] / st_["spec_decode_num_draft_tokens"]
    assert value("kvserve:spec_decode_draft_acceptance_rate") == pytest.approx(rate)
    assert st_["spec_decode_mean_accepted_length"] == pytest.approx(
        1 + st_["spec_decode_num_accepted_tokens"] / st_["spec_decode_num_drafts"])


def test_server_metrics_report_speculation(tiny_path):
    import time

    from fastapi.testclient import TestClient

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.entrypoints.openai.app import build_app

    engine = AsyncLLMEngine(LLMEngine(model=str(tiny_path), kv_cache_memory="4MiB", speculative_config=NGRAM))
    try:
        with TestClient(build_app(engine, "tiny")) as http:
            prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            want = engine.engine.scheduler.spec_stats.num_draft_tokens
            assert want > 0
            for _ in range(100):  # the engine thread refreshes its stats snapshot when idle
                text = http.get("/metrics").text
                line = next(x for x in text.splitlines() if x.startswith("kvserve:spec_decode_num_draft_tokens_total "))
                if float(line.split()[1]) == want:
                    break
                time.sleep(0.02)
            assert float(line.split()[1]) == want
            assert "kvserve:spec_decode_num_accepted_tokens_total " in text
            assert "kvserve:spec_decode_draft_acceptance_rate " in text
    finally:
        engine.shutdown()


# -- random workloads on a fake runner ---------------------------------------------------------

PATTERN = [3, 9, 4, 1, 7, 2, 8]


class PeriodicRunner(FakeRunner):
    """A 'greedy model' whose next token follows a period-7 pattern, with a noise token every 11th
    position: n-gram drafts are often right and sometimes wrong."""

    def token(self, num_tokens: int) -> int:
        return 40 + num_tokens % 5 if num_tokens % 11 == 0 else PATTERN[num_tokens % len(PATTERN)]


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 30), st.integers(1, 3), st.integers(0, 2),
              st.sampled_from([None, 7, 41]), st.sampled_from([0, 3])),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


def check_rolled_back(eng: LLMEngine) -> None:
    """Between steps no request holds a block past its tokens, and a block carries a prefix-cache hash
    only when computed (accepted) tokens fill it, and then the hash of exactly those tokens."""
    from kvserve.engine.kv_cache import hash_block

    kv, bs = eng.kv, eng.kv.block_size
    for r in eng.scheduler.running:
        blocks = kv.req_blocks.get(r.request_id, [])
        assert len(blocks) <= kv.blocks_needed(r.num_tokens), (len(blocks), r.num_tokens)
        parent = None
        for i, b in enumerate(blocks):
            if (i + 1) * bs > r.num_tokens:
                break
            h = hash_block(parent, r.all_token_ids[i * bs : (i + 1) * bs])
            if b.block_hash is not None:
                assert (i + 1) * bs <= r.num_computed_tokens and b.block_hash == h
            parent = h


def _workload(tiny, ops, spec, num_blocks, block_size, budget, max_seqs, caching, mode):
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * block_size
    eng = LLMEngine(loaded=tiny, kv_cache_memory=num_blocks * per_block, block_size=block_size,
                    max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_prefix_caching=caching,
                    preemption_mode=mode, swap_space=8 * per_block, speculative_config=spec)
    eng.runner = PeriodicRunner(eng)
    ids, aborted, outs = [], set(), {}
    r = PeriodicRunner(eng)

    def step() -> None:
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = [(c.token_ids, c.finish_reason) for c in o.outputs]
        eng.kv.check_invariants()
        check_rolled_back(eng)

    for o in ops:
        if o[0] == "add":
            _, plen, max_tokens, n, shift, stop, min_tokens = o
            prompt = [(r.token(i) + shift) % 50 for i in range(plen)]  # shift 0: the pattern itself
            rid = f"q{len(ids)}"
            try:
                eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, n=n,
                                                            ignore_eos=True, min_tokens=min(min_tokens, max_tokens),
                                                            stop_token_ids=[stop] if stop is not None else None))
                ids.append(rid)
            except Exception as e:  # noqa: BLE001 - only "does not fit" is acceptable
                assert "KV cache" in str(e) or "max_model_len" in str(e), e
        elif o[0] == "abort" and ids:
            aborted.add(ids[o[1] % len(ids)])
            eng.abort_request(ids[o[1] % len(ids)])
        else:
            for _ in range(o[1]):
                step()
    for _ in range(10_000):
        if not eng.has_unfinished_requests():
            break
        step()
    assert not eng.has_unfinished_requests(), "a request was never finished (livelock)"
    assert set(outs) == set(ids)
    assert eng.kv.pool.num_used_blocks == 0 and not eng.kv.req_blocks and not eng.kv.swapped
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
    return {rid: v for rid, v in outs.items() if rid not in aborted}, eng


def test_periodic_workload_drafts_accepts_and_rejects(tiny):
    ops = [("add", 20, 30, 1, 0, None, 0), ("add", 9, 25, 2, 1, 41, 0), ("add", 14, 30, 1, 0, 7, 3),
           ("step", 3), ("add", 25, 12, 1, 0, None, 0)]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    with_spec, eng = _workload(tiny, ops, spec, 24, 4, 16, 4, True, "recompute")
    without, plain = _workload(tiny, ops, None, 24, 4, 16, 4, True, "recompute")
    assert with_spec == without
    st_ = eng.stats()
    assert 0 < st_["spec_decode_num_accepted_tokens"] < st_["spec_decode_num_draft_tokens"]
    assert plain.stats()["spec_decode_num_drafts"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40), num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.sampled_from([2, 5, 16, 64]), max_seqs=st.sampled_from([1, 4, 16]), caching=st.booleans(),
       mode=st.sampled_from(["recompute", "swap"]), k=st.integers(1, 5))
def test_random_workloads_with_speculation(tiny, ops, num_blocks, block_size, budget, max_seqs, caching, mode, k):
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "adaptive": False}
    with_spec, eng = _workload(tiny, ops, spec, num_blocks, block_size, budget, max_seqs, caching, mode)
    without, _ = _workload(tiny, ops, None, num_blocks, block_size, budget, max_seqs, caching, mode)
    assert with_spec == without  # no token lost, duplicated or changed; stops cut at the same place
    st_ = eng.stats()
    event(f"drafted: {st_['spec_decode_num_drafts'] > 0}, rejected: "
          f"{st_['spec_decode_num_accepted_tokens'] < st_['spec_decode_num_draft_tokens']}")


class FixedStepTime:
    """A step-time model that ignores the engine's clock: seconds = a + b * tokens."""

    empty = False

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def observe(self, num_tokens: int, seconds: float) -> None:
        pass

    def estimate(self, num_tokens: int) -> float:
        return self.a + self.b * num_tokens

    def line(self, at: int) -> tuple[float, float]:
        return self.a + self.b * at, self.b

    def costs(self, base: int, extra: int, fallback=None) -> list[float]:  # noqa: ANN001
        return [self.a + self.b * (base + n) for n in range(extra + 1)]


@pytest.mark.parametrize("cost", ["memory-bound", "compute-bound", "measured"])
def test_adaptive_draft_lengths_follow_step_cost_and_stay_exact(tiny, prompts, reference, cost):
    """Where extra positions are free every draft is kept; where each costs a token's share none is
    (the oracle is right 2 times in 3); on the real clock, whatever is chosen, the tokens are the same."""
    spec = {**NGRAM, "adaptive": True}
    eng = with_proposer(make_engine(tiny, spec), oracle(prompts, reference, corrupt_every=3))
    control = eng.scheduler.draft_control
    assert control is not None
    if cost != "measured":
        control.step_time = FixedStepTime(1.0, 0.0) if cost == "memory-bound" else FixedStepTime(0.0, 1.0)
    rows_only, with_prompt = set(), set()  # step sizes: steps of one-token rows, steps with prompt tokens
    eng.step_observers.append(lambda so, dt: (rows_only if all(
        s.num_new_tokens - len(s.spec_token_ids) == 1 for s in so.scheduled) else with_prompt).add(so.total_num_tokens))
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    st_ = eng.stats()
    if cost == "memory-bound":
        assert st_["spec_decode_num_drafts"] > 20
        assert st_["spec_decode_num_draft_tokens"] > 3 * st_["spec_decode_num_drafts"]  # whole drafts (k=4 mostly)
    elif cost == "compute-bound":
        assert st_["spec_decode_num_drafts"] == 0
    else:  # only steps of one-token rows taught the model (a prompt's tokens are cheaper than a row's)
        assert control.step_time.counts == sorted({StepTimeModel.bucket(n) for n in rows_only})
        assert with_prompt - rows_only
    assert NGRAM["adaptive"] is False and make_engine(tiny, NGRAM).scheduler.draft_control is None


class KindedOracle(OracleProposer):
    """A lookup proposer that says what kind each draft is: every other call a kind-4 draft (the reference,
    right) and a kind-1 one (its first token wrong), as n-gram lookup reports its match length."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(refs, corrupt_every=0)
        self.kinds = {1: 0, 4: 0}  # draft tokens proposed per kind

    def lookup(self, token_ids: list[int], k: int) -> tuple[list[int], int]:
        draft = OracleProposer.propose(self, token_ids, k)
        if not draft:
            return [], 0
        kind = 4 if self.calls % 2 else 1
        if kind == 1:
            draft[0] = (draft[0] + 1) % TINY_VOCAB
        self.kinds[kind] += len(draft)
        return draft, kind


class UntoldOracle(KindedOracle):
    """The same drafts through `propose` alone: the scheduler is not told their kinds."""

    lookup = None  # (what the scheduler looks for)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return KindedOracle.lookup(self, token_ids, k)[0]


def test_adaptive_lengths_learn_the_acceptance_of_each_kind_of_draft(tiny, prompts, reference):
    """A step costing 1 + 0.01 per token: a draft position pays where it is accepted with p > ~0.2 (the
    step's 24 decodes emit ~19 tokens a unit of time). The kind-1 drafts (always rejected) are learnt and cut, the
    kind-4 ones (always right) kept whole: far fewer tokens drafted and rejected than when the kinds are
    not told (the same drafts through `propose`), and the same tokens either way."""
    def engine(proposer):
        eng = with_proposer(make_engine(tiny, {**NGRAM, "adaptive": True}), proposer)
        eng.scheduler.draft_control.step_time = FixedStepTime(1.0, 0.01)
        return eng

    told = engine(KindedOracle({tuple(p): r for p, r in zip(prompts, reference)}))
    assert tokens(run(told, prompts, GREEDY), len(prompts)) == reference
    control = told.scheduler.draft_control
    assert set(control.kinds) == {1, 4}
    assert control.kinds[1][0] == 0 and control.kinds[1][1] >= 1  # kind 1: rejected every time it was tried
    assert control.kinds[4][0] > 20 * control.kinds[4][1]  # kind 4: accepted (rejections only at max_tokens)
    assert control.acceptance(None, 1) < 0.2 < 0.8 < control.acceptance(None, 4)

    blind = engine(UntoldOracle({tuple(p): r for p, r in zip(prompts, reference)}))
    assert tokens(run(blind, prompts, GREEDY), len(prompts)) == reference
    assert blind.scheduler.draft_control.kinds == {}
    a, b = told.stats(), blind.stats()
    rejected = [s["spec_decode_num_draft_tokens"] - s["spec_decode_num_accepted_tokens"] for s in (a, b)]
    assert rejected[0] < 0.5 * rejected[1]
    assert a["spec_decode_acceptance_rate"] > b["spec_decode_acceptance_rate"] + 0.1
    assert a["spec_decode_num_accepted_tokens"] >= 0.9 * b["spec_decode_num_accepted_tokens"]


@pytest.mark.parametrize("path", ["torch", "native"])
def test_seeded_sampling_under_speculation_gives_the_tokens_of_decoding_without(tiny, tiny_int8, prompts, path):
    """Sampled requests speculate too: each draft position is drawn as its own step would draw it and
    the generator is left where one-token decoding leaves it, so with a seed the tokens are the same,
    whatever was drafted, accepted or rejected (top-k / top-p rows included)."""
    loaded = tiny if path == "torch" else tiny_int8
    params = [SamplingParams(temperature=t, top_p=tp, top_k=tk, seed=100 + i, max_tokens=20, ignore_eos=True)
              for i, (t, tp, tk) in enumerate([(0.7, 1.0, 0), (1.0, 0.9, 0), (0.5, 1.0, 20), (1.3, 0.95, 50)] * 4)]
    ps = prompts[: len(params)]
    want = tokens(run(make_engine(loaded), ps, params), len(ps))
    # drafts: the unspeculated sampled continuation, corrupted every second proposal, so runs of
    # accepted tokens and rejections at every draft position both occur
    eng = with_proposer(make_engine(loaded, NGRAM), oracle(ps, want, corrupt_every=2))
    assert tokens(run(eng, ps, params), len(ps)) == want
    st_ = eng.stats()
    assert st_["spec_decode_num_drafts"] > 20
    assert 0 < st_["spec_decode_num_accepted_tokens"] < st_["spec_decode_num_draft_tokens"]


def test_unseeded_sampling_under_speculation_keeps_the_distribution(tiny):
    """Without a seed: over 1000 samples of a three-token continuation, with the second token always
    drafted as the same guess, the distribution of the first two tokens matches 1000 samples without
    speculation (total variation < 0.15; two samples of one distribution on this support differ by
    about 0.07; accepting every draft would put the guess's whole mass on one token, TV ~0.6)."""
    torch.manual_seed(0)  # the unseeded draws come from torch's global generator: a repeatable test
    prompt = random_ids(12, TINY_VOCAB, seed=7)
    params = SamplingParams(temperature=2.0, top_k=4, max_tokens=3, ignore_eos=True)
    n = 1000

    def sample(spec, proposer=None):
        eng = make_engine(tiny, spec, max_num_seqs=64)
        if proposer is not None:
            with_proposer(eng, proposer)
        hist: dict[tuple[int, ...], float] = {}
        for t in tokens(run(eng, [prompt] * n, params), n):
            hist[tuple(t[:2])] = hist.get(tuple(t[:2]), 0) + 1 / n
        return hist, eng.stats()

    base, _ = sample(None)
    seconds: dict[int, float] = {}
    for (_, y2), p in base.items():
        seconds[y2] = seconds.get(y2, 0) + p
    guess = max(seconds, key=seconds.get)

    class Guess:
        k = 1

        def propose(self, token_ids, k):
            return [guess] if len(token_ids) - len(prompt) == 1 else []

    spec_hist, st_ = sample(NGRAM, Guess())
    assert st_["spec_decode_num_drafts"] == n
    assert 0.03 * n < st_["spec_decode_num_accepted_tokens"] < 0.5 * n  # the guess is right about 1 time in 15
    support = set(base) | set(spec_hist)
    tv = 0.5 * sum(abs(base.get(x, 0) - spec_hist.get(x, 0)) for x in support)
    assert tv < 0.15, (tv, len(support))
    print(f"total variation {tv:.3f} over {len(support)} pairs")


def test_waiting_requests_without_a_seat_do_not_make_drafts_look_costly(tiny, prompts, reference):
    """One seat (max_num_seqs=1): the queued prompts cannot join the step, so they must not count in its
    tokens. With time = 1 + 0.1 per token a draft position at the prior's 0.5 pays (1.5 / 1.2 > 1 / 1.1);
    counting a queued 30-token prompt as well would make it look a loss (31.5 / 4.2 < 31 / 4.1)."""
    ps = [random_ids(30, TINY_VOCAB, seed=300 + i) for i in range(3)]
    want = tokens(run(make_engine(tiny, max_num_seqs=1), ps, GREEDY), 3)
    eng = with_proposer(make_engine(tiny, {**NGRAM, "adaptive": True}, max_num_seqs=1), oracle(ps, want))
    eng.scheduler.draft_control.step_time = FixedStepTime(1.0, 0.1)
    assert tokens(run(eng, ps, GREEDY), 3) == want
    st_ = eng.stats()
    assert st_["spec_decode_num_drafts"] > 3 * 5  # each request drafts while the others wait


def test_compute_bound_steps_still_probe_one_token_now_and_then(tiny):
    """Where no draft pays (time in proportion to tokens) a request still drafts one token after a run of
    steps without one, so its acceptance is measured again; the tokens are unchanged. The run is
    PROBE_AFTER steps, longer where the probes of the step's requests would cost over PROBE_SHARE of it."""
    from kvserve.spec_decode.adaptive import DraftLengthController

    ps = [random_ids(12, TINY_VOCAB, seed=400 + i) for i in range(2)]
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    want = tokens(run(make_engine(tiny), ps, params), 2)
    eng = with_proposer(make_engine(tiny, {**NGRAM, "adaptive": True}), oracle(ps, want, corrupt_every=0))
    control = eng.scheduler.draft_control
    control.step_time = FixedStepTime(0.0, 1.0)
    # two one-token decodes a step, a third position costs half a step: 2 x 0.5 / 1% of the step
    assert control.probe_interval(2, 2) == 100 > DraftLengthController.PROBE_AFTER
    control.PROBE_SHARE = 0.02  # 50 steps, so this short run sees a probe per request
    assert control.probe_interval(2, 2) == 50
    assert tokens(run(eng, ps, params), 2) == want
    st_ = eng.stats()
    probes = 2 * ((70 - 2) // (50 + 1))  # per request: one every 51 decode steps (every 33 would make it 2 each)
    assert st_["spec_decode_num_drafts"] == st_["spec_decode_num_draft_tokens"] == probes
