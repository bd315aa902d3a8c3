"""Block pool and scheduler invariants under random workloads (hypothesis), without running a model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import FakeRunner, make_tiny_hf
from kvserve import SamplingParams
from kvserve.engine.kv_cache import BlockPool, hash_block
from kvserve.engine.llm_engine import LLMEngine
from kvserve.errors import InvalidRequestError
from kvserve.loader import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama"))


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 30), st.integers(1, 3), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=60), num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.sampled_from([1, 3, 16, 64]), max_seqs=st.sampled_from([1, 4, 16]), caching=st.booleans(),
       mode=st.sampled_from(["recompute", "swap", "auto"]), host_blocks=st.integers(1, 20),
       retain=st.sampled_from([0, 2, 10_000]))
def test_random_workloads_keep_block_invariants(tiny, ops, num_blocks, block_size, budget, max_seqs, caching, mode,
                                                host_blocks, retain):
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * block_size
    eng = LLMEngine(loaded=tiny, kv_cache_memory=num_blocks * per_block, block_size=block_size,
                    max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_prefix_caching=caching,
                    preemption_mode=mode, swap_space=host_blocks * per_block, prefix_cache_memory=retain * per_block)
    eng.scheduler.config.swap_min_tokens = 8  # let auto choose both ways on these short requests
    eng.runner = FakeRunner(eng)
    ids: list[str] = []
    finished: set[str] = set()
    for o in ops:
        if o[0] == "add":
            _, plen, max_tokens, n, prefix = o
            prompt = [prefix] * (plen // 2) + list(range(plen - plen // 2))  # shared prefixes across requests
            rid = f"q{len(ids)}"
            try:
                eng.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True))
                ids.append(rid)
            except InvalidRequestError as e:
                assert "KV cache" in str(e) or "max_model_len" in str(e)
        elif o[0] == "abort" and ids:
            eng.abort_request(ids[o[1] % len(ids)])
        else:
            for _ in range(o[1]):
                for out in eng.step():
                    if out.finished:
                        finished.add(out.request_id)
                eng.kv.check_invariants()
        eng.kv.check_invariants()
    for _ in range(10_000):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                finished.add(out.request_id)
        eng.kv.check_invariants()
    event(f"swapped: {eng.scheduler.num_swaps > 0}, preempted: {eng.scheduler.num_preemptions > 0}")
    assert not eng.has_unfinished_requests(), "a request was never finished (livelock)"
    assert finished == set(ids)  # nothing lost
    assert eng.kv.pool.num_used_blocks == 0 and not eng.kv.req_blocks and not eng.kv.swapped
    assert eng.kv.host_pool is None or eng.kv.host_pool.num_used_blocks == 0
    pool = eng.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_pool_lru_eviction_and_reuse():
    pool = BlockPool(4)
    a = pool.allocate(2)
    h0, h1 = hash_block(None, [1, 2]), hash_block(hash_block(None, [1, 2]), [3, 4])
    pool.register(a[0], h0)
    pool.register(a[1], h1)
    pool.free(list(reversed(a)))
    assert pool.num_cached_blocks == 2 and pool.num_free_blocks == 4
    b = pool.allocate(2)  # uncached blocks go first
    assert {x.block_id for x in b}.isdisjoint({x.block_id for x in a})
    assert pool.lookup(h0) is a[0]
    pool.touch([a[0]])
    assert pool.num_free_blocks == 1
    c = pool.allocate(1)  # evicts the only evictable block: the cached h1
    assert c[0] is a[1] and pool.lookup(h1) is None and pool.num_evictions == 1
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.check_invariants()


def test_retained_cache_is_bounded_by_peak_use_plus_allowance():
    """A lazily committed pool hands out fresh blocks only while the blocks ever used stay under
    the peak in use plus the allowance; past it, the least recently used cached block is reused."""
    pool = BlockPool(16, retain_blocks=1)
    for i in range(5):  # five requests one after another, each filling 2 blocks that stay cached
        a = pool.allocate(2)
        pool.register(a[0], hash_block(None, [i, 0]))
        pool.register(a[1], hash_block(None, [i, 1]))
        pool.free(list(reversed(a)))
        pool.check_invariants()
    assert pool.peak_used == 2 and pool.num_touched_blocks == 3  # 2 in use at peak + 1 kept for the cache
    assert pool.num_cached_blocks == 3 and pool.num_evictions == 7
    assert pool.lookup(hash_block(None, [4, 1])) is not None  # the newest survive
    assert pool.lookup(hash_block(None, [0, 0])) is None
    assert pool.num_free_blocks == 16
    # demand beyond the touched blocks still gets fresh ones (all 16 are usable)
    b = pool.allocate(16)
    assert sorted(x.block_id for x in b) == list(range(16)) and pool.peak_used == 16
    pool.check_invariants()


def test_unbounded_pool_prefers_fresh_blocks_over_cached():
    pool = BlockPool(6)  # retain_blocks None (a GPU cache, allocated whole): keep every cached block
    a = pool.allocate(2)
    pool.register(a[0], hash_block(None, [1]))
    pool.free(a)
    assert [b.block_id for b in pool.allocate(2)] == [1, 2]  # the plain freed block, then a fresh one
    assert pool.lookup(hash_block(None, [1])) is a[0]
    pool.check_invariants()


def test_engine_rss_blocks_follow_load_not_history(tiny):
    """Many different prompts one after another: the blocks ever touched stay at the peak one request
    needed plus the prefix cache allowance, however large the budget."""
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    eng = LLMEngine(loaded=tiny, kv_cache_memory=200 * per_block, block_size=4, prefix_cache_memory=3 * per_block)
    eng.runner = FakeRunner(eng)
    for i in range(12):
        eng.add_request(f"r{i}", [i + 1] * 10, SamplingParams(max_tokens=6, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        eng.kv.check_invariants()
    pool = eng.kv.pool
    assert pool.peak_used == 4 and pool.num_touched_blocks == 4 + 3
    eng.add_request("again", [12] * 10 + [0], SamplingParams(max_tokens=1))  # the last prompt is still cached
    assert eng.kv.get_computed_blocks(eng.scheduler.waiting[0])[1] == 8


def test_hash_is_chained_and_content_addressed():
    assert hash_block(None, [1, 2, 3]) == hash_block(None, [1, 2, 3])
    assert hash_block(None, [1, 2, 3]) != hash_block(None, [1, 2, 4])
    assert hash_block(hash_block(None, [9]), [1]) != hash_block(hash_block(None, [8]), [1])


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
@pytest.mark.parametrize("caching", [False, True])
def test_memory_pressure_with_aborts(tiny, mode, caching):
    """A fixed workload that must preempt: invariants after every step, nothing lost, all freed."""
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    eng = LLMEngine(loaded=tiny, kv_cache_memory=14 * per_block, block_size=4, max_num_seqs=8,
                    max_num_batched_tokens=24, enable_prefix_caching=caching, preemption_mode=mode,
                    swap_space=10 * per_block)
    eng.scheduler.config.swap_min_tokens = 8
    eng.runner = FakeRunner(eng)
    ids = []
    for i in range(12):
        prompt = [7] * 8 + [i] * 12  # a shared 8-token prefix
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=20, ignore_eos=True, n=1 + i % 2))
        ids.append(f"r{i}")
    finished = set()
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished.add(out.request_id)
        eng.kv.check_invariants()
        steps += 1
        if steps == 15:
            eng.abort_request("r3")
            eng.abort_request("r10")
        assert steps < 5000
    assert finished == set(ids)
    assert eng.scheduler.num_preemptions > 0
    assert (eng.scheduler.num_swaps > 0) == (mode != "recompute")
    assert eng.kv.pool.num_used_blocks == 0 and not eng.kv.swapped


def test_internal_waste_counts_shared_blocks_once(tiny):
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    eng = LLMEngine(loaded=tiny, kv_cache_memory=64 * per_block, block_size=4)
    eng.runner = FakeRunner(eng)
    eng.add_request("a", [1] * 10, SamplingParams(max_tokens=5, ignore_eos=True, n=2))
    eng.step()  # first sample: 10 prompt tokens -> 3 blocks, 2 of them full
    assert abs(eng.stats()["kv_internal_waste_perc"] - 2 / 12) < 1e-9
    eng.step()  # sibling shares the 2 full blocks, recomputes its tail
    st = eng.stats()
    # blocks: 2 shared full (8 slots), a's tail holds 3 of 4 (11 tokens), b's tail holds 2 of 4
    assert st["blocks_used"] == 4 and abs(st["kv_internal_waste_perc"] - (1 - 13 / 16)) < 1e-9
