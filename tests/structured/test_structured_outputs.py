"""Structured outputs on a tiny random Llama: every output under a JSON schema validates, regex / choice /
grammar outputs match, EOS only where the grammar is complete, length when it cannot be, batched == alone
with unconstrained rows beside, preemption keeps the matcher in step, bad constraints fail before any KV."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from helpers import make_tiny_hf
from helpers_schemas import SCHEMAS
from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.errors import InvalidRequestError
from kvserve.kernels import cpu as native
from kvserve.layers.sampler import Sampler
from kvserve.loader import load_model
from kvserve.structured import GrammarBackend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama"))


def _llm(tiny, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "8MiB")
    return LLM(loaded=tiny, **kw)


@pytest.fixture(scope="module")
def llm(tiny):
    return _llm(tiny)


def S(**kw) -> StructuredOutputsParams:  # noqa: N802 - reads as the constraint it builds
    return StructuredOutputsParams(**kw)


def _gen(llm: LLM, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_every_schema_output_validates(llm):
    """Random weights, sampled: the grammar alone makes every output valid JSON of its schema."""
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=200, structured_outputs=S(json=schema))
              for i, (_, schema) in enumerate(SCHEMAS)]
    outs = _gen(llm, [f"json {i}:" for i in range(len(SCHEMAS))], params)
    assert len(SCHEMAS) >= 30
    for (what, schema), c in zip(SCHEMAS, outs):
        assert c.finish_reason == "stop", (what, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    # the unconstrained control: the same model and seeds emit no JSON at all
    free = _gen(llm, ["json 0:"], SamplingParams(temperature=1.0, seed=0, max_tokens=20, ignore_eos=True))
    with pytest.raises(ValueError):
        json.loads(free[0].text)


def test_json_object_regex_choice_grammar(llm):
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    lark = 'start: "(" num ("*" num)* ")"\nnum: /[1-9][0-9]?/'
    specs = [S(json_object=True), S(regex=r"[0-9]{3}-[a-z]{2,4}"), S(choice=["red", "green", "blue"]),
             S(grammar=lark), S(grammar=gbnf), S(json='{"type": "array", "items": {"type": "integer", '
                                                     '"minimum": 0, "maximum": 9}, "maxItems": 3}')]
    # random weights put about equal mass on every token a JSON string allows, so a string would
    # rarely end within max_tokens: a logit bias towards the closing characters makes objects short
    tok = llm.get_tokenizer()
    closers = {tok.encode(c, add_special_tokens=False)[0]: 6.0 for c in '"}'}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, n=3, structured_outputs=spec,
                             logit_bias=closers if s == 0 else None)
              for s, spec in enumerate(specs)]
    outs = llm.generate([f"p{i}" for i in range(len(specs))], params, use_tqdm=False)
    checks = [lambda t: isinstance(json.loads(t), dict), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t),
              lambda t: t in ("red", "green", "blue"), lambda t: re.fullmatch(r"\([1-9][0-9]?(\*[1-9][0-9]?)*\)", t),
              lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t),
              lambda t: len(json.loads(t)) <= 3 and all(0 <= x <= 9 for x in json.loads(t))]
    for o, check in zip(outs, checks):
        for c in o.outputs:
            assert c.finish_reason == "stop" and check(c.text), c.text
    # n samples: one matcher each, following its own tokens
    assert len({c.text for o in outs[:2] for c in o.outputs}) >= 4


def test_eos_only_where_the_grammar_is_complete(llm):
    eos = llm.engine.tokenizer.eos_token_id
    wants_eos = {eos: 100.0}
    free = _gen(llm, ["x"], SamplingParams(temperature=0, max_tokens=8, logit_bias=wants_eos))
    assert free[0].token_ids == [eos]  # the bias alone ends at once
    (c,) = _gen(llm, ["x"], SamplingParams(temperature=0, max_tokens=8, logit_bias=wants_eos,
                                           structured_outputs=S(regex=r"[0-9]{3}")))
    assert re.fullmatch(r"[0-9]{3}", c.text) and c.finish_reason == "stop"
    # an open-ended grammar that already accepts: EOS (pushed by the bias) ends it at its first chance
    (c,) = _gen(llm, ["x"], SamplingParams(temperature=0, max_tokens=8, logit_bias=wants_eos,
                                           structured_outputs=S(regex=r"a+")))
    assert c.text == "a" and c.token_ids[-1] == eos and c.finish_reason == "stop"


def test_unsatisfiable_within_max_tokens_ends_with_length(llm):
    (c,) = _gen(llm, ["x"], SamplingParams(temperature=0, max_tokens=5, structured_outputs=S(regex=r"[a-z]{40}")))
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and re.fullmatch(r"[a-z]+", c.text)


MIXED = [
    SamplingParams(temperature=0, max_tokens=24, structured_outputs=S(json=SCHEMAS[0][1])),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=24, structured_outputs=S(regex=r"(ab|cd)+[0-9]")),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=24, structured_outputs=S(choice=["alpha", "beta"])),
    SamplingParams(temperature=0.8, seed=3, max_tokens=24, structured_outputs=S(json_object=True)),
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
]
MIXED_PROMPTS = ["hello there", "the cat", "a b c d", "in the", "zzz", "x", "the the the"]


def test_batched_equals_alone_with_unconstrained_rows(tiny, llm):
    alone = [_gen(llm, [p], sp)[0].token_ids for p, sp in zip(MIXED_PROMPTS, MIXED)]
    assert [c.token_ids for c in _gen(llm, MIXED_PROMPTS, MIXED)] == alone
    chunked = _llm(tiny, max_num_batched_tokens=8, block_size=4)  # prefill chunks beside constrained decodes
    assert [c.token_ids for c in _gen(chunked, MIXED_PROMPTS, MIXED)] == alone
    assert llm.engine.runner.sampler.grammar_mask_rows > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_the_matcher_in_step(tiny, llm, mode):
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=S(json=SCHEMAS[i][1]))
              for i in range(12)]
    reference = [c.token_ids for c in _gen(llm, prompts, params)]
    m = tiny.config
    per_block = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * 4
    small = _llm(tiny, kv_cache_memory=40 * per_block, block_size=4, preemption_mode=mode, swap_space=40 * per_block)
    outs = _gen(small, prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in outs] == reference
    for c, (_, schema) in zip(outs, SCHEMAS):
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
    small.engine.kv.check_invariants()


BAD = [
    (dict(json={"type": "foo"}), "invalid json"),
    (dict(json='{"type": "object", '), "not valid JSON"),
    (dict(json={"type": "string", "minLength": 3, "maxLength": 2}), "minLength"),
    (dict(json={"not": {"type": "string"}}), "not"),
    (dict(regex="a(b"), "unclosed group"),
    (dict(grammar="start: foo"), "unknown name"),
    (dict(grammar="root ::= [a-"), "invalid grammar"),
    (dict(choice=[]), "non-empty list"),
    (dict(choice=["a", 3]), "non-empty list"),
    (dict(regex="a", choice=["a"]), "exactly one"),
    (dict(), "exactly one"),
]


@pytest.mark.parametrize("kw, message", BAD, ids=[m for _, m in BAD])
def test_bad_constraint_fails_before_any_kv(llm, kw, message):
    eng = llm.engine
    free = eng.kv.pool.num_free_blocks
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        eng.add_request("bad", "x", SamplingParams(structured_outputs=StructuredOutputsParams(**kw)))
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == free


def test_compiled_grammars_cached_by_text(tiny):
    backend = GrammarBackend(tiny.tokenizer, tiny.config.vocab_size)
    a = backend.compile(S(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    b = backend.compile(S(json='{"type": "object", "properties": {"a": {"type": "integer"}}}'))
    c = backend.compile(S(json={"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert a is b and c is not a  # key order is the output's: another text, another grammar
    assert (backend.hits, backend.misses) == (1, 2)
    assert backend.compile(S(choice=["x", "y"])) is backend.compile(S(choice=["x", "y"]))
    m1, m2 = a.matcher(), a.matcher()
    assert m1.accept(tiny.tokenizer.encode("{", add_special_tokens=False)[0]) and m2.num_tokens == 0


def test_sampler_masks_only_constrained_rows(tiny, llm):
    """The mask is exactly the grammar's allowed set on its row; other rows' logits are untouched."""
    backend = llm.engine.input_processor.grammars
    r_free, r_cons = (type("R", (), {})() for _ in range(2))
    for r in (r_free, r_cons):
        r.params, r.output_token_ids, r.all_token_ids = SamplingParams(temperature=0), [], [1]
        r.eos_token_ids, r.stop_token_ids, r.generator, r.grammar = set(), set(), None, None
    r_cons.grammar = backend.compile(S(regex=r"[0-9]")).matcher()
    V = tiny.config.vocab_size
    logits = torch.randn(2, V)
    logits[:, tiny.tokenizer.encode("x", add_special_tokens=False)[0]] = 50.0  # both rows' favourite
    sampler = Sampler()
    out = sampler(logits.clone(), [r_free, r_cons])
    digits = {tiny.tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)}
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in digits and out.token_ids[1] == max(digits, key=lambda t: float(logits[1, t]))
    assert sampler.grammar_mask_rows == 1
    sampler(logits.clone(), [r_free, r_free])
    assert sampler.grammar_mask_rows == 1  # unconstrained batches never reach the grammar code


@pytest.mark.skipif(not native.available(), reason="no C compiler or no SIMD ISA")
@pytest.mark.parametrize("vocab,width", [(49152, 49152), (100, 96 + 37), (70, 64)])
def test_native_mask_equals_the_torch_expansion(vocab, width):
    """The in-place C mask against the bool expansion it replaces: same -inf positions, other rows
    and allowed logits untouched, tokens past the grammar's vocabulary never allowed."""
    g = torch.Generator().manual_seed(vocab + width)
    words = (vocab + 31) // 32
    bits = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(5, width, generator=g)
    rows = [4, 0, 2]
    want = logits.clone()
    allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(3, words * 32)[:, :width].bool()
    if allowed.shape[1] < width:
        allowed = torch.cat([allowed, allowed.new_zeros(3, width - allowed.shape[1])], dim=1)
    want[rows] = want[rows].masked_fill(~allowed, float("-inf"))
    native.mask_logits(logits, bits, torch.tensor(rows))
    assert torch.equal(logits, want)
    assert torch.isinf(logits[[1, 3]]).sum() == 0
