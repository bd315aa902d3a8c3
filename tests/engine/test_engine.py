"""The engine on a tiny random Llama: batch invariance, chunking, preemption, sampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_VOCAB, make_tiny_hf, random_ids
from kvserve import LLM, SamplingParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.errors import InvalidRequestError
from kvserve.executor.reference import greedy_generate
from kvserve.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_path):
    return load_model(tiny_path)


def engine(tiny_loaded, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "4MiB")
    return LLM(loaded=tiny_loaded, **kw)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [random_ids(int(n), TINY_VOCAB, seed=i) for i, n in enumerate(rng.integers(1, 60, size=64))]


@pytest.fixture(scope="module")
def reference(tiny_loaded, prompts):
    """Each prompt alone through the simple loop (itself checked against transformers)."""
    return [greedy_generate(tiny_loaded.model, [p], 16)[0] for p in prompts]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_batch_invariance_64_prompts(tiny_loaded, prompts, reference):
    llm = engine(tiny_loaded)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts[:16]]
    assert alone == reference[:16]
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.pool.num_used_blocks == 0


def test_heavy_chunking(tiny_loaded, prompts, reference):
    llm = engine(tiny_loaded, max_num_batched_tokens=16, block_size=4)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference


@pytest.mark.parametrize("mode, caching", [("recompute", False), ("recompute", True), ("swap", False),
                                           ("swap", True), ("auto", True)])
def test_preemption_keeps_outputs(tiny_loaded, prompts, reference, mode, caching):
    # 40 blocks of 4 tokens: far fewer than 64 running sequences need
    m = tiny_loaded.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    llm = engine(tiny_loaded, kv_cache_memory=40 * per_block, block_size=4, enable_prefix_caching=caching,
                 preemption_mode=mode, swap_space=30 * per_block)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outs) == reference
    sched = llm.engine.scheduler
    print(f"{mode}: preemptions {sched.num_preemptions}, swaps {sched.num_swaps}")
    assert sched.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == sched.num_preemptions
    if mode == "swap":
        assert sched.num_swaps > 0
    if mode == "recompute":
        assert sched.num_swaps == 0
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.pool.num_used_blocks == 0 and not kv.swapped
    assert kv.host_pool is None or kv.host_pool.num_used_blocks == 0


@pytest.fixture(scope="module")
def reference_int8(tiny_loaded, prompts):
    import torch

    return [greedy_generate(tiny_loaded.model, [p], 16, kv_dtype=torch.int8)[0] for p in prompts]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_int8_kv_cache(tiny_loaded, prompts, reference, reference_int8, mode):
    """int8 KV: batched == alone through an int8 cache (also across swaps), close to the float cache,
    and about 4x the tokens of float32 in the same memory."""
    m = tiny_loaded.config
    per_block = m.num_layers * 2 * m.num_kv_heads * (m.head_dim + 4) * 4  # int8 values + fp32 scale, 4 tokens
    llm = engine(tiny_loaded, kv_cache_dtype="int8", kv_cache_memory=40 * per_block, block_size=4,
                 preemption_mode=mode, swap_space=30 * per_block)
    assert llm.engine.kv.num_blocks == 40 and llm.engine.runner.kv_caches[0].k.dtype.is_floating_point is False
    assert "KV cache (int8)" in llm.engine.budget.describe()
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outs) == reference_int8
    assert llm.engine.scheduler.num_preemptions > 0
    if mode == "swap":
        assert llm.engine.scheduler.num_swaps > 0
    same = sum(a == b for a, b in zip(reference_int8, reference))
    assert same >= 48, f"only {same}/64 int8 greedy continuations equal the float cache's"
    f32 = LLMEngine(loaded=tiny_loaded, kv_cache_memory="1MiB").budget.kv_tokens
    i8 = LLMEngine(loaded=tiny_loaded, kv_cache_memory="1MiB", kv_cache_dtype="int8").budget.kv_tokens
    assert abs(i8 / f32 - 4 * m.head_dim / (m.head_dim + 4)) < 0.05
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        LLMEngine(loaded=tiny_loaded, kv_cache_dtype="fp4")


def test_int8_quantize_round_trip():
    import torch

    from kvserve.layers.attention import quantize_int8

    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50).view(50, 1, 1)
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (50, 3)
    back = q.float() * s.float().unsqueeze(-1)
    err = (back - x).abs().amax(-1) / x.abs().amax(-1)
    assert float(err.max()) < 1 / 127 and q.abs().amax() == 127
    assert not quantize_int8(torch.zeros(2, 4))[0].any()  # all-zero rows stay zero, no NaN


def test_copy_blocks_between_pools(tiny_loaded):
    import torch

    from kvserve.layers.attention import allocate_kv_caches, copy_blocks

    a = allocate_kv_caches(tiny_loaded.model, 6, 4, torch.float32)
    b = allocate_kv_caches(tiny_loaded.model, 3, 4, torch.float32)
    for c in a:
        c.k.normal_()
        c.v.normal_()
    copy_blocks(a, b, [(5, 0), (2, 2)])
    for x, y in zip(a, b):
        assert torch.equal(y.k[0], x.k[5]) and torch.equal(y.v[2], x.v[2]) and not y.k[1].any()
    # an int8 pool moves its scales with its values
    a = allocate_kv_caches(tiny_loaded.model, 6, 4, torch.int8)
    b = allocate_kv_caches(tiny_loaded.model, 3, 4, torch.int8)
    for c in a:
        for t in c.tensors():
            t.copy_(torch.randint(-100, 100, t.shape))
    copy_blocks(a, b, [(5, 0)])
    for x, y in zip(a, b):
        assert len(y.tensors()) == 4
        assert all(torch.equal(ty[0], tx[5]) for tx, ty in zip(x.tensors(), y.tensors()))


def test_prefix_cache_hits_do_not_change_outputs(tiny_loaded, prompts, reference):
    llm = engine(tiny_loaded, block_size=4)
    shared = prompts[5][:40] if len(prompts[5]) >= 40 else (prompts[5] * 40)[:40]
    batch = [shared + p[:8] for p in prompts[:8]]
    ref = [greedy_generate(tiny_loaded.model, [b], 16)[0] for b in batch]
    assert _tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == ref
    assert llm.engine.kv.prefix_hits > 0
    assert _tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == ref  # now all from cache


def test_seeded_sampling_reproducible_across_batches(tiny_loaded, prompts):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    llm = engine(tiny_loaded)
    alone = _tokens(llm.generate([prompts[3]], sp, use_tqdm=False))[0]
    others = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
    mixed = llm.generate([prompts[1], prompts[3], prompts[7]], [others, sp, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    draws = {tuple(_tokens(llm.generate([prompts[3]], unseeded, use_tqdm=False))[0]) for _ in range(3)}
    assert len(draws) > 1  # really sampling


def test_n4_shares_prompt_blocks(tiny_loaded):
    llm = engine(tiny_loaded, block_size=4)
    eng = llm.engine
    prompt = random_ids(42, TINY_VOCAB, seed=9)  # 10 full blocks + 2 tokens
    sp = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    eng.add_request("r", prompt, sp)
    checked = False
    while eng.has_unfinished_requests():
        outs = eng.step()
        eng.kv.check_invariants()
        tables = [eng.kv.block_ids(f"r#{i}") for i in range(4)]
        if all(tables) and not checked:
            # the 10 full prompt blocks are one set of blocks with 4 references; tails are private
            assert all(t[:10] == tables[0][:10] for t in tables)
            assert all(eng.kv.pool.blocks[b].ref_cnt == 4 for b in tables[0][:10])
            tails = [b for t in tables for b in t[10:]]
            assert len(set(tails)) == len(tails)
            assert eng.kv.pool.num_used_blocks == 10 + len(tails)
            checked = True
    assert checked
    out = outs[0]
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert eng.kv.pool.num_used_blocks == 0


def test_stop_strings_and_tokens(tiny_loaded):
    llm = engine(tiny_loaded)
    tok = llm.get_tokenizer()
    base = llm.generate(["the man"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    assert text == tok.decode(ids)
    stop = text[5:8]
    out = llm.generate(["the man"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)] and stop not in out.text
    out = llm.generate(["the man"], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[3]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[: ids.index(ids[3]) + 1] and out.finish_reason == "stop"
    out = llm.generate(["the man"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == ids[:5]


def test_min_tokens_and_logit_bias(tiny_loaded):
    llm = engine(tiny_loaded)
    eos = llm.get_tokenizer().eos_token_id
    # bias EOS up: without min_tokens the request ends at once
    sp = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    assert llm.generate(["hi"], sp, use_tqdm=False)[0].outputs[0].token_ids == [eos]
    sp = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={eos: 100.0})
    out = llm.generate(["hi"], sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]


def test_logprobs_and_prompt_logprobs(tiny_loaded):
    import torch

    llm = engine(tiny_loaded, max_num_batched_tokens=8)  # prompt logprobs across chunks
    p = random_ids(20, TINY_VOCAB, seed=11)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1,
                                           ignore_eos=True), use_tqdm=False)[0]
    with torch.no_grad():
        from helpers import run_prefill

        ref = torch.log_softmax(run_prefill(tiny_loaded.model, [p + out.outputs[0].token_ids])[0], -1)
    lps = out.outputs[0].logprobs
    for j, lp in enumerate(lps):
        assert lp.top[0][0] == lp.token_id  # greedy picks the top token
        assert abs(lp.logprob - ref[len(p) - 1 + j, lp.token_id].item()) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        assert abs(out.prompt_logprobs[j].logprob - ref[j - 1, p[j]].item()) < 1e-4


def test_penalties_change_greedy_choice(tiny_loaded):
    llm = engine(tiny_loaded)
    p = [5] * 30
    plain = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    pen = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0,
                                           presence_penalty=2.0), use_tqdm=False)
    toks = pen[0].outputs[0].token_ids
    assert toks != plain[0].outputs[0].token_ids
    rep = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=100.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert 5 not in rep[:1]  # the repeated prompt token is pushed down


@pytest.mark.parametrize("bad, match", [
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(n=0), "n must be >= 1"),
    (dict(best_of_everything=3), "unknown sampling parameter"),
])
def test_bad_sampling_params(bad, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**bad)


def test_bad_requests_leave_others_untouched(tiny_loaded):
    llm = engine(tiny_loaded)
    eng = llm.engine
    eng.add_request("good", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request("a", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request("a", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"prompt \(3 tokens\) \+ max_tokens \(300\) = 303 exceeds max_model_len \(256\)"):
        eng.add_request("b", [1, 2, 3], SamplingParams(max_tokens=300))
    with pytest.raises(InvalidRequestError, match=f"token id {TINY_VOCAB} is out of vocabulary"):
        eng.add_request("c", [1, TINY_VOCAB], SamplingParams())
    with pytest.raises(InvalidRequestError, match="token id -1"):
        eng.add_request("c", [-1], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("good", [1], SamplingParams())
    with pytest.raises(InvalidRequestError, match="unknown engine argument"):
        LLMEngine(loaded=tiny_loaded, max_num_seq=3)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [o.request_id for o in outs if o.finished] == ["good"] and len(outs[-1].outputs[0].token_ids) == 4
    assert eng.kv.pool.num_used_blocks == 0


def test_request_larger_than_cache_rejected(tiny_loaded):
    m = tiny_loaded.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 16
    llm = engine(tiny_loaded, kv_cache_memory=2 * per_block)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(tiny_loaded):
    llm = engine(tiny_loaded)
    eng = llm.engine
    eng.add_request("x", [1] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("y", [2] * 10, SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    eng.abort_request("x")
    outs = eng.step()
    aborted = [o for o in outs if o.request_id == "x"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.pool.num_used_blocks == 0


def test_chunked_prefill_does_not_stall_decodes(tiny_loaded):
    llm = engine(tiny_loaded, max_num_batched_tokens=16)
    eng = llm.engine
    eng.add_request("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    eng.step()
    eng.step()
    eng.add_request("long", [4] * 200, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    steps = 0
    while eng.scheduler.requests.get("long") and eng.scheduler.requests["long"].num_computed_tokens < 200:
        so_before = len(eng.scheduler.requests["short"].output_token_ids)
        eng.step()
        steps += 1
        assert len(eng.scheduler.requests["short"].output_token_ids) == so_before + 1  # one decode every step
    assert steps >= 200 // 16


def test_memory_plan_is_measured_and_reported(tiny_loaded):
    from kvserve.engine.llm_engine import LLMEngine as Engine

    eng = Engine(loaded=tiny_loaded, max_num_seqs=4, cpu_memory_utilization=0.01)
    b = eng.budget
    assert isinstance(b.activations, int)  # profiled, not given
    assert f"activations {b.activations / 2**20:.0f} MiB" in b.describe()
    given = Engine(loaded=tiny_loaded, max_num_seqs=4, kv_cache_memory="1MiB").budget
    assert given.activations is None and "activations not measured" in given.describe()
    assert given.num_blocks == 2**20 // (16 * given.kv_bytes_per_token)
    # capped at every seat filled to max_model_len
    assert b.kv_tokens <= 4 * eng.max_model_len and b.num_blocks == eng.kv.num_blocks
    text = b.describe()
    assert "weights" in text and "activations" in text and f"{b.kv_tokens} tokens" in text
    assert f"max concurrency at max_model_len={eng.max_model_len}" in text
    k = eng.runner.kv_caches[0].k
    assert tuple(k.shape) == (b.num_blocks, 16, tiny_loaded.config.num_kv_heads, tiny_loaded.config.head_dim)


def test_kv_cache_memory_strings(tiny_loaded):
    from kvserve.config import parse_bytes

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5MB") == 1_500_000 and parse_bytes(4096) == 4096
    with pytest.raises(InvalidRequestError, match="cannot parse"):
        LLMEngine(loaded=tiny_loaded, kv_cache_memory="lots")
    with pytest.raises(InvalidRequestError, match="holds no block"):
        LLMEngine(loaded=tiny_loaded, kv_cache_memory=10)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_weights_batch_invariance(tiny_path, prompts, method):
    """W8A8 / W4A8 weights: 64 prompts batched == each alone through the reference loop."""
    lm = load_model(tiny_path, quantization=method)
    assert lm.quantization == method and f"{method} weights" in lm.describe()
    assert all(m.qweight is not None for m in lm.model.modules() if hasattr(m, "qweight"))
    ref = [greedy_generate(lm.model, [p], 16)[0] for p in prompts]
    llm = engine(lm, kv_cache_dtype="float32")  # the reference loop attends in float32
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == ref
    llm = engine(lm)  # the default: a float16 cache on the quantized CPU path
    assert llm.engine.kv_dtype == torch.float16
    batched = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert batched == [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts[:8]] + batched[8:]
    with pytest.raises(Exception, match="unknown method"):
        load_model(tiny_path, quantization="fp4")
    # auto leaves a float checkpoint alone
    assert load_model(tiny_path, quantization="auto").quantization == "none"


def test_dtype_auto_is_float32_on_cpu(tiny_path):
    import torch

    eng = LLMEngine(model=str(tiny_path), kv_cache_memory="1MiB")
    assert eng.config.dtype == "float32" and eng.lm.dtype == torch.float32 and eng.kv_dtype == torch.float32
    assert LLMEngine(model=str(tiny_path), kv_cache_memory="1MiB", dtype="bfloat16").lm.dtype == torch.bfloat16
