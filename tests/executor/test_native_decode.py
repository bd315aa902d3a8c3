"""The fused native decode step (kvserve.executor.native_decoder.NativeDecoder) against the op-by-op model."""

from __future__ import annotations

import pytest
import torch

from kvserve.executor.native_decoder import NativeDecoder
from kvserve.kernels import cpu as native
from kvserve.kernels.testing import clone_cache, make_case
from kvserve.layers.attention import KVCache, set_attention_backend
from kvserve.layers.attention.cpu_native import CPUNativeAttentionBackend
from kvserve.loader import load_model
from helpers import make_tiny_hf

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler or no SIMD ISA (AVX-512, AVX2, NEON)")

SEQ_LENS = [1, 17, 40, 5, 33]


def _caches(model, cache_dtype: torch.dtype, seed: int):
    """A decode batch (one new token per sequence) over random cached prefixes, one cache per layer."""
    cfg = model.config
    cases = [make_case([1] * len(SEQ_LENS), SEQ_LENS, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       int8=cache_dtype == torch.int8, seed=seed + i) for i in range(cfg.num_layers)]
    caches = []
    for c in cases:
        t = c.kv_cache
        if cache_dtype == torch.bfloat16:
            t = tuple(x.to(torch.bfloat16) for x in t)
        caches.append(KVCache(*t))
    return cases[0].meta, caches


def _copy(caches):
    return [KVCache(*clone_cache(tuple(c.tensors()))) for c in caches]


@pytest.fixture(scope="module", params=[("llama", "int8"), ("qwen2", "int8"), ("qwen3", "int8"), ("llama", "none"),
                                        ("qwen2", "none")], ids="-".join)
def native_model(request, tmp_path_factory):
    """A tiny model on the fused step's weight formats: int8, or float32 read in place (kind 2; qwen2's
    projections carry biases)."""
    arch, quantization = request.param
    path = make_tiny_hf(tmp_path_factory.mktemp(arch), arch)
    model = load_model(str(path), quantization=quantization).model
    set_attention_backend(model, CPUNativeAttentionBackend())  # the fused step stands in for this backend
    return model


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float16])
def test_fused_decode_matches_op_by_op(native_model, cache_dtype):
    meta, caches = _caches(native_model, cache_dtype, seed=7)
    assert NativeDecoder.supports(native_model, caches)
    ids = torch.tensor([5, 77, 300, 12, 9])
    pos = meta.seq_lens.long() - 1
    want_caches, got_caches = _copy(caches), _copy(caches)
    with torch.inference_mode():
        want = native_model(ids, pos, meta, want_caches)
        got = NativeDecoder(native_model, got_caches).forward(ids, pos, meta)
    # the same arithmetic up to float rounding order (norm sums, exp), amplified at most by a flipped
    # int8 activation rounding: far below the hidden states' own scale of ~1
    assert (got - want).abs().max().item() < 2e-2
    torch.testing.assert_close(native_model.compute_logits(got), native_model.compute_logits(want), atol=5e-2, rtol=0)
    assert (native_model.compute_logits(got).argmax(-1) == native_model.compute_logits(want).argmax(-1)).all()
    for a, b in zip(got_caches, want_caches):  # every layer wrote its new K/V rows, as the torch path does
        for x, y in zip(a.tensors(), b.tensors()):
            if x.dtype == torch.int8:
                assert (x.int() - y.int()).abs().max().item() <= 2
            else:
                # new rows come out of int8-activation GEMMs: a flipped rounding moves a value by a
                # step of its group's scale, a few percent of the rows' range at most
                torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0.03 * float(y.float().abs().max()))


def test_fused_extend_matches_op_by_op(native_model):
    """Prompt chunks in one native call (kv_llama_extend): each sequence's new tokens attend as an extend
    of its paged cache, as the op-by-op forward's prefill attention does."""
    cfg = native_model.config
    q_lens, seq_lens = [9, 70, 1], [40, 100, 17]
    cases = [make_case(q_lens, seq_lens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=3 + i)
             for i in range(cfg.num_layers)]
    caches = [KVCache(*c.kv_cache) for c in cases]
    meta = cases[0].meta
    ids = torch.randint(0, 250, (sum(q_lens),), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    want_caches, got_caches = _copy(caches), _copy(caches)
    with torch.inference_mode():
        want = native_model(ids, pos, meta, want_caches)
        got = NativeDecoder(native_model, got_caches).extend(ids, pos, meta)
    assert (got - want).abs().max().item() < 2e-2
    assert (native_model.compute_logits(got).argmax(-1) == native_model.compute_logits(want).argmax(-1)).float().mean() > 0.95
    for a, b in zip(got_caches, want_caches):
        for x, y in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0.03 * float(y.float().abs().max()))


@pytest.mark.parametrize("isa", native.supported_isas())
def test_fused_decode_rows_do_not_depend_on_the_batch(native_model, isa):
    meta, caches = _caches(native_model, torch.int8, seed=11)
    ids = torch.tensor([5, 77, 300, 12, 9])
    pos = meta.seq_lens.long() - 1
    with torch.inference_mode(), native.use_isa(isa):
        full = NativeDecoder(native_model, _copy(caches)).forward(ids, pos, meta)
        for i in range(len(SEQ_LENS)):
            sub = type(meta)(meta.query_start_loc[: 2] * 1, meta.seq_lens[i : i + 1], [1], [SEQ_LENS[i]],
                             meta.slot_mapping[i : i + 1], meta.block_tables[i : i + 1])
            one = NativeDecoder(native_model, _copy(caches)).forward(ids[i : i + 1], pos[i : i + 1], sub)
            assert torch.equal(one, full[i : i + 1])


@pytest.mark.parametrize("isa", [i for i in native.supported_isas() if i != "scalar"])
def test_fused_decode_variants_match_scalar(native_model, isa):
    """Each SIMD variant's fused step against the portable scalar build (lane sums differ in order only)."""
    meta, caches = _caches(native_model, torch.bfloat16, seed=5)
    ids = torch.tensor([5, 77, 300, 12, 9])
    pos = meta.seq_lens.long() - 1
    outs = []
    for variant in (isa, "scalar"):
        with torch.inference_mode(), native.use_isa(variant):
            c = _copy(caches)
            outs.append((NativeDecoder(native_model, c).forward(ids, pos, meta), c))
    (got, got_c), (want, want_c) = outs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_c, want_c):
        for x, y in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-2)


def test_runner_uses_the_fused_step_only_where_it_applies(tmp_path):
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    path = str(make_tiny_hf(tmp_path, "llama"))
    float_engine = LLMEngine(model=path, kv_cache_memory="4MiB")  # float32 weights, read in place (kind 2)
    assert float_engine.runner.native is not None
    assert {la.qkv.kind for la in float_engine.runner.native.layers} == {2}
    assert LLMEngine(model=path, kv_cache_memory="4MiB", dtype="bfloat16").runner.native is None  # float32 only
    engine = LLMEngine(model=path, quantization="int8", kv_cache_memory="4MiB")
    assert engine.runner.native is not None
    assert engine.runner.native.extends and not float_engine.runner.native.extends
    calls = []
    real, real_extend = engine.runner.native.forward, engine.runner.native.extend
    engine.runner.native.forward = lambda *a: calls.append(len(a[0])) or real(*a)
    engine.runner.native.extend = lambda *a: calls.append(("extend", len(a[0]))) or real_extend(*a)
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert len(outs[0].outputs[0].token_ids) == 6
    assert calls == [5] + [1] * 5  # the short prompt fused too, one row per token, then five decode steps
    calls.clear()
    engine.add_request("b", [(7 * i) % 250 + 3 for i in range(100)], SamplingParams(max_tokens=2, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    assert calls == [64, ("extend", 36), 1]  # positions below 64 fused, the rest of the prompt as one extend


def test_prompt_tokens_take_a_path_fixed_by_position(tmp_path):
    """Prompt tokens below FUSED_PROMPT_POSITIONS (64) go fused, the rest op by op: a 200-token prompt in
    one chunk or in chunks of 48 (which split differently around the threshold) gives identical
    tokens and logprobs."""
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.executor.forward_batch import FUSED_PROMPT_POSITIONS

    path = str(make_tiny_hf(tmp_path, "llama"))
    prompt = [(7 * i) % 250 + 3 for i in range(200)]
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0, logprobs=3)
    results = []
    for budget in (2048, 48):
        engine = LLMEngine(model=path, quantization="int4", kv_cache_memory="4MiB", max_num_batched_tokens=budget,
                           enable_prefix_caching=False)
        calls = []
        real = engine.runner.native.forward
        engine.runner.native.forward = lambda *a: calls.append(len(a[0])) or real(*a)
        engine.add_request("p", prompt, params)
        outs = []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
        c = outs[0].outputs[0]
        results.append((c.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs]))
        assert sum(calls) == FUSED_PROMPT_POSITIONS + 4  # the prompt's first tokens, then 4 decodes
    assert results[0] == results[1]


def test_mixed_step_splits_decodes_from_prefill(tmp_path):
    """A step holding decodes and a newcomer's short prompt runs them in one fused call; the
    decodes' tokens equal those of a run without the newcomer."""
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(make_tiny_hf(tmp_path, "llama")), quantization="int8", kv_cache_memory="4MiB")
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)

    def run(with_newcomer: bool) -> tuple[list[int], list[int]]:
        calls = []
        real = engine.runner.native.forward
        engine.runner.native.forward = lambda *a: calls.append(len(a[0])) or real(*a)
        engine.add_request("a", [1, 2, 3, 4, 5], params)
        engine.step()
        engine.step()
        if with_newcomer:
            engine.add_request("b", list(range(10, 40)), params)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        engine.runner.native.forward = real
        return outs["a"].outputs[0].token_ids, calls

    alone, calls_alone = run(False)
    mixed, calls_mixed = run(True)
    assert mixed == alone
    assert calls_alone == [5] + [1] * 7
    # a's decode and b's 30-token prompt in one fused call (one row per token), then both decoding
    assert calls_mixed[2] == 31 and 2 in calls_mixed
