"""Draft-model speculation (draft_model, self_quant, layer-skip) on tiny random models: greedy and seeded
tokens identical to decoding without speculation (batched, chunked, prefix-cached, preempted, n > 1,
aborted), one draft forward per draft position for the whole batch, the draft's rollback and catch-up
with its exact token counts, its own KV invariants after every step, and the config errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_VOCAB, make_tiny_hf, random_ids
from kvserve import SamplingParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.request import Request
from kvserve.errors import InvalidRequestError
from kvserve.executor.memory import kv_bytes_per_token
from kvserve.kernels import cpu as native
from kvserve.layers.attention import make_attention_backend, set_attention_backend
from kvserve.loader import load_model
from kvserve.spec_decode.draft_model import DraftModelProposer
from test_spec_engine import run, tokens

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

pytestmark = pytest.mark.skipif(not native.available(), reason="the drafts run on the native CPU kernels")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path)  # float32 weights: the target


def draft_spec(tiny_path, **kw) -> dict:
    """The same checkpoint in int8 as a draft_model: right most of the time, not always."""
    return {"method": "draft_model", "model": str(tiny_path), "quantization": "int8", "num_speculative_tokens": 4,
            "adaptive": False, **kw}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    out = [random_ids(int(n), TINY_VOCAB, seed=200 + i) for i, n in enumerate(rng.integers(2, 40, size=12))]
    out.append(out[1] + [5, 6, 7])  # shares a cached prefix with prompt 1
    out.append(random_ids(70, TINY_VOCAB, seed=9))  # past the fused prompt positions (64)
    return out


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return tokens(run(LLMEngine(loaded=tiny, kv_cache_memory="4MiB"), prompts, GREEDY), len(prompts))


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 16, "block_size": 4},
                                {"enable_prefix_caching": False, "block_size": 2, "max_num_batched_tokens": 5},
                                {"max_num_seqs": 3}],
                         ids=["default", "chunked", "tiny-budget-no-prefix-cache", "few-seqs"])
def test_draft_model_gives_identical_greedy_tokens(tiny, tiny_path, prompts, reference, kw):
    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path), **kw)
    assert eng.scheduler.proposer.lm.quantization == "int8" and eng.scheduler.proposer.runner.native is not None
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    st = eng.stats()
    assert st["spec_decode_num_drafts"] > 20
    assert 0.5 < st["spec_decode_acceptance_rate"] < 1.0  # accepted runs and rejections both happened


@pytest.mark.parametrize("layers", [None, 1])
def test_self_quant_and_layer_skip_give_identical_greedy_tokens(tiny, prompts, reference, layers):
    spec = {"method": "self_quant", "num_speculative_tokens": 3, "draft_layers": layers}
    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=spec, block_size=4)
    draft = eng.scheduler.proposer.lm
    assert draft.quantization == "int4"  # a float HF checkpoint's self-draft: its int4 weights
    assert len(draft.model.model.layers) == draft.config.num_layers == (layers or tiny.config.num_layers)
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    st = eng.stats()
    assert st["spec_decode_num_accepted_tokens"] > 0 and st["spec_decode_num_drafts"] > 0


def test_preemption_frees_and_rebuilds_the_draft_state(tiny, tiny_path, prompts, reference):
    m = tiny.config
    draft = load_model(tiny_path, quantization="int8")
    per_block = 4 * (kv_bytes_per_token(tiny.model, torch.float32) + kv_bytes_per_token(draft.model, torch.float16))
    for mode in ("recompute", "swap"):
        eng = LLMEngine(loaded=tiny, kv_cache_memory=24 * per_block, block_size=4, preemption_mode=mode,
                        swap_space=30 * 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4,
                        speculative_config=draft_spec(tiny_path))
        assert eng.kv.num_blocks == eng.scheduler.proposer.kv.num_blocks == 24
        assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
        assert eng.scheduler.num_preemptions > 0, mode


def test_seeded_sampling_n_and_abort(tiny, tiny_path, prompts, reference):
    """Sampled requests draft the draft's argmax and keep their seeded tokens; n > 1 siblings share the
    draft's prefix cache; aborted requests leave no draft state."""
    params = [SamplingParams(temperature=t, top_p=tp, seed=50 + i, max_tokens=16, ignore_eos=True)
              for i, (t, tp) in enumerate([(0.7, 1.0), (0.1, 0.9), (0.03, 1.0)] * 3)]
    ps = prompts[: len(params)]
    want = tokens(run(LLMEngine(loaded=tiny, kv_cache_memory="4MiB"), ps, params), len(ps))
    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path))
    assert tokens(run(eng, ps, params), len(ps)) == want
    st = eng.stats()
    print({k: v for k, v in st.items() if k.startswith("spec")})
    assert 0 < st["spec_decode_num_accepted_tokens"] < st["spec_decode_num_draft_tokens"]
    two = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2)
    done = run(eng, prompts[:6], two, abort_after={2: 3, 4: 5})
    for i in (0, 1, 3, 5):
        assert [c.token_ids for c in done[f"r{i}"].outputs] == [reference[i]] * 2
    assert done["r2"].outputs[0].finish_reason == done["r4"].outputs[0].finish_reason == "abort"


def test_drafting_is_one_forward_per_draft_position_for_the_batch(tiny, tiny_path, prompts, reference):
    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path))
    prop = eng.scheduler.proposer
    calls: list[list[int]] = []  # per draft forward: the rows of each request in it
    forward, propose = prop._forward, prop.propose_batch

    def spy_forward(scheduled):
        calls[-1].append(len(scheduled))
        return forward(scheduled)

    def spy_propose(reqs, lengths):
        calls.append([])
        drafts = propose(reqs, lengths)
        assert len(calls[-1]) == max(len(d) for d in drafts)  # forward j drafts position j of every request
        return drafts

    prop._forward, prop.propose_batch = spy_forward, spy_propose
    assert tokens(run(eng, prompts[:8], GREEDY), 8) == reference[:8]
    assert max(c[0] for c in calls if c) == 8  # all eight requests' drafts in one call, their first forward
    assert sum(len(c) for c in calls) <= 4 * len(calls)


def test_rollback_to_the_accepted_prefix_then_catch_up(tiny_path):
    """After a rejection the draft keeps exactly the accepted draft tokens computed and catches up on the
    target's token; after a full acceptance it catches up on two. Its drafts then equal those of a fresh
    draft that computes the same tokens from scratch (its K/V was rolled back, not left stale)."""
    draft = load_model(tiny_path, quantization="int8")
    set_attention_backend(draft.model, make_attention_backend("auto", torch.device("cpu")))

    def proposer() -> DraftModelProposer:
        return DraftModelProposer(draft, 4, 32, 4, torch.float16, torch.device("cpu"), vocab_size=TINY_VOCAB,
                                  max_catch_up_tokens=64, max_model_len=256)

    prop = proposer()
    assert prop.runner.native is not None  # one-token rows on the fused path: bit-identical to a fresh draft
    computed: list[list[tuple[int, int]]] = []  # per forward: (first position, tokens) of each row
    forward = prop._forward

    def spy(scheduled):
        computed.append([(s.start, s.num_new_tokens) for s in scheduled])
        return forward(scheduled)

    prop._forward = spy

    def fresh_drafts(req: Request) -> list[int]:
        return proposer().propose_batch([req], [4])[0]

    prompt = random_ids(21, TINY_VOCAB, seed=5)
    req = Request("a", prompt, GREEDY, [], 256)
    d = prop.propose_batch([req], [4])[0]
    assert len(d) == 4 and computed == [[(0, 21)], [(21, 1)], [(22, 1)], [(23, 1)]]
    st = prop.states["a"]
    assert (st.shadow.num_computed_tokens, st.guesses) == (21, d[:3])

    req.append_token(d[0])  # the target accepts one draft token, then its own differs from d[1]
    req.append_token((d[1] + 1) % TINY_VOCAB)
    computed.clear()
    d2 = prop.propose_batch([req], [4])[0]
    assert computed[0] == [(22, 1)]  # kept 21 + d[0]; computes the target's token only
    assert d2 == fresh_drafts(req)
    assert len(prop.kv.req_blocks["a"]) == prop.kv.blocks_needed(req.num_tokens + 3)

    for t in d2:  # the target accepts the whole draft and adds its own
        req.append_token(t)
    req.append_token(7)
    computed.clear()
    d3 = prop.propose_batch([req], [2])[0]
    assert computed == [[(req.num_tokens - 2, 2)], [(req.num_tokens, 1)]]  # d2[3] and the target's 7, then d3[0]
    assert d3 == fresh_drafts(req)[:2]
    prop.release("a")
    assert prop.kv.pool.num_used_blocks == 0 and not prop.states


class MemoryBound:
    """A step-time model where a step costs one second whatever its tokens (the draft's forwards are cheap)."""

    empty = False

    def observe(self, num_tokens: int, seconds: float) -> None:
        pass

    def estimate(self, num_tokens: int) -> float:
        return 1.0

    def line(self, at: int) -> tuple[float, float]:
        return 1.0, 0.0

    def costs(self, base: int, extra: int, fallback=None) -> list[float]:  # noqa: ANN001
        return [1.0] * (extra + 1)


def test_adaptive_lengths_with_a_draft_model_stay_exact(tiny, tiny_path, prompts, reference):
    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path, adaptive=True))
    eng.scheduler.draft_control.step_time = MemoryBound()
    eng.scheduler.proposer.draft_time.prior = None  # (it would scale the 1 s steps): free until timed
    assert tokens(run(eng, prompts, GREEDY), len(prompts)) == reference
    assert not eng.scheduler.proposer.draft_time.empty  # the draft's forwards were timed for the choice
    assert eng.stats()["spec_decode_num_draft_tokens"] > 3 * eng.stats()["spec_decode_num_drafts"]  # near-whole
    fresh = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path, adaptive=True))
    draft_time, ratio = fresh.scheduler.proposer.draft_time, fresh.scheduler.proposer.lm.weight_bytes / tiny.weight_bytes
    fresh.scheduler.draft_control.any_step_time.observe(8, 0.1)  # every step: prompt chunks too
    assert draft_time.empty and draft_time.estimate(8) == pytest.approx(0.1 * ratio)  # before any draft forward


def test_a_draft_with_another_vocabulary_is_refused(tiny, tiny_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_path, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap their ids
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidRequestError, match="another tokenizer than the target"):
        LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(other))


def test_config_errors(tiny, tiny_path):
    bad = [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "draft_model needs \"model\""),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model is for method draft_model"),
        ({"method": "self_quant", "num_speculative_tokens": 2, "draft_layers": 0}, "draft_layers must be"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_layers": 2}, "draft_layers must be"),
        ({"method": "self_quant", "num_speculative_tokens": 2, "quantization": "int3"}, "quantization must be"),
    ]
    for value, msg in bad:
        with pytest.raises(InvalidRequestError) as e:
            LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=value)
        assert msg in str(e.value), (value, str(e.value))
    quantized = load_model(tiny_path, quantization="int8")
    with pytest.raises(InvalidRequestError, match="needs a float target"):
        LLMEngine(loaded=quantized, kv_cache_memory="4MiB",
                  speculative_config={"method": "self_quant", "num_speculative_tokens": 2})
    with pytest.raises(Exception, match="num_layers must be in"):
        LLMEngine(loaded=tiny, kv_cache_memory="4MiB",
                  speculative_config={"method": "self_quant", "num_speculative_tokens": 2, "draft_layers": 9})


class ComputeBound:
    """A step-time model where every token costs the same (no draft position ever pays)."""

    empty = False

    def observe(self, num_tokens: int, seconds: float) -> None:
        pass

    def estimate(self, num_tokens: int) -> float:
        return float(num_tokens)

    def line(self, at: int) -> tuple[float, float]:
        return float(at), 1.0

    def costs(self, base: int, extra: int, fallback=None) -> list[float]:  # noqa: ANN001
        return [float(base + n) for n in range(extra + 1)]


def test_probes_only_for_requests_the_draft_follows(tiny, tiny_path):
    """Where no draft pays, a request the draft already follows still drafts one token now and then (a
    probe re-measures its acceptance), but one it never drafted for is never probed: its first draft
    would cost the draft a prompt prefill."""
    from kvserve.spec_decode.adaptive import DraftLengthController

    ps = [random_ids(12, TINY_VOCAB, seed=500 + i) for i in range(2)]
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    want = tokens(run(LLMEngine(loaded=tiny, kv_cache_memory="4MiB"), ps, params), 2)

    never = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path, adaptive=True))
    never.scheduler.draft_control.step_time = ComputeBound()
    assert tokens(run(never, ps, params), 2) == want
    assert never.stats()["spec_decode_num_drafts"] == 0

    eng = LLMEngine(loaded=tiny, kv_cache_memory="4MiB", speculative_config=draft_spec(tiny_path))
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    for _ in range(3):  # prefill, then two steps of whole drafts: the draft follows both requests
        eng.step()
    assert all(eng.scheduler.proposer.follows(f"r{i}") for i in range(2))
    before = eng.stats()
    eng.scheduler.draft_control = DraftLengthController(ComputeBound())
    eng.scheduler.draft_control.PROBE_SHARE = 1.0  # probes every PROBE_AFTER steps, however much they cost
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert tokens(done, 2) == want
    after = eng.stats()
    probes = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    assert probes > 0 and after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"] == probes
