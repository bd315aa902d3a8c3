"""The sampler's draw: the distribution it samples, what top-k / top-p cut is never drawn, seeds."""

from __future__ import annotations

import math

import torch

from kvserve import SamplingParams
from kvserve.engine.request import Request
from kvserve.layers.sampler import Sampler


def _req(seed=None, **kw) -> Request:
    return Request("r", [1, 2], SamplingParams(seed=seed, **kw), [], 1000)


def test_draws_follow_the_distribution():
    """20,000 draws from p = (.5, .25, .125, .0625, .0625, 0): each frequency within 4 standard errors,
    and the zero-probability token never."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    logits = torch.log(p).unsqueeze(0).repeat(1000, 1)  # 1000 rows a call: 20 calls
    s, n = Sampler(), 20_000
    counts = torch.zeros(6)
    for _ in range(n // 1000):
        reqs = [_req(temperature=1.0) for _ in range(1000)]
        for t in s(logits.clone(), reqs).token_ids:
            counts[t] += 1
    freq = counts / n
    assert counts[5] == 0
    for i in range(5):
        se = math.sqrt(p[i] * (1 - p[i]) / n)
        assert abs(freq[i] - p[i]) < 4 * se, (i, freq.tolist())


def test_top_k_and_top_p_cut_tokens_are_never_drawn():
    torch.manual_seed(1)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    got_k = Sampler()(logits.clone(), [_req(temperature=1.0, top_k=2) for _ in range(500)]).token_ids
    assert set(got_k) == {0, 1}
    # softmax: .644 .237 .087 ...: top_p 0.8 keeps the first two
    got_p = Sampler()(logits.clone(), [_req(temperature=1.0, top_p=0.8) for _ in range(500)]).token_ids
    assert set(got_p) == {0, 1}


def test_a_seed_repeats_its_draws_whatever_the_rest_of_the_batch():
    logits = torch.randn(8, 50)
    a = [_req(seed=3, temperature=1.0)]
    alone = Sampler()(logits[:1].clone(), a).token_ids
    for _ in range(5):
        a[0] = _req(seed=3, temperature=1.0)
        others = [_req(temperature=1.0) for _ in range(7)]
        assert Sampler()(logits.clone(), a + others).token_ids[0] == alone[0]


def test_verify_rows_record_the_generator_after_each_position():
    r = _req(seed=9, temperature=1.0)
    logits = torch.randn(3, 40)
    Sampler()(logits.clone(), [r, r, r])
    assert len(r.rng_states) == 3
    # the state after the first position's draw is what a generator that drew once has
    g = torch.Generator().manual_seed(9)
    torch.rand(1, generator=g, dtype=torch.float64)
    assert torch.equal(r.rng_states[0], g.get_state())
    assert torch.equal(r.rng_states[2], r.generator.get_state())
