"""Adaptive draft lengths (spec_decode/adaptive.py): the step-time curve, the acceptance estimate and the
lengths chosen, with exact numbers; no model (the engine-level tests are in test_spec_engine.py)."""

from __future__ import annotations

import pytest

from kvserve.config import SpeculativeConfig
from kvserve.errors import InvalidRequestError
from kvserve.spec_decode.adaptive import Acceptance, DraftLengthController, StepTimeModel


def model(points: dict[int, float]) -> StepTimeModel:
    m = StepTimeModel()
    for n, t in points.items():
        m.observe(n, t)
    return m


def test_step_time_interpolates_clamps_below_and_grows_in_proportion_above():
    m = model({1: 0.010, 4: 0.013, 16: 0.040})
    assert m.estimate(1) == m.estimate(0) == 0.010
    assert m.estimate(2) == pytest.approx(0.011)
    assert m.estimate(10) == pytest.approx(0.0265)
    assert m.estimate(32) == pytest.approx(0.080)  # beyond the largest: compute-bound, in proportion


def test_step_time_running_average_buckets_and_monotone_curve():
    m = model({1: 0.050})  # a cold first step
    m.observe(1, 0.020)
    assert m.estimate(1) == pytest.approx(0.020)  # the second observation replaces the first
    m.observe(1, 0.010)
    assert m.estimate(1) == pytest.approx(0.018)  # then a running average: 0.020 + 0.2 * (0.010 - 0.020)
    m.observe(8, 0.030)
    assert m.estimate(8) == pytest.approx(0.030)
    m.observe(8, 0.005)  # more tokens seen cheaper: fewer cost no more than that
    assert m.estimate(8) == m.estimate(1) == pytest.approx(0.005)
    m.observe(200, 1.0)
    m.observe(223, 2.0)  # one bucket of 32 above 128 tokens
    m.observe(201, 1.5)
    assert StepTimeModel.bucket(223) == StepTimeModel.bucket(200) == 192
    assert m.estimate(192) == pytest.approx(1.9)  # 2.0 + 0.2 * (1.5 - 2.0)
    m.observe(0, 1.0), m.observe(3, 0.0)  # ignored
    assert m.estimate(3) == pytest.approx(0.005)


def test_a_cold_small_step_does_not_price_the_larger_ones():
    """An engine's first step (10 tokens, cold: 0.5 s) and then decode steps of 16 at 0.15 s: a step of 10
    costs no more than one of 16, and the 16s are priced at what they took."""
    m = model({10: 0.535, 512: 0.830})
    for _ in range(3):
        m.observe(16, 0.150)
    assert m.estimate(10) == m.estimate(16) == pytest.approx(0.150)
    assert m.estimate(80) == pytest.approx(0.150 + (0.830 - 0.150) * 64 / 496)


def test_acceptance_estimate_mixes_the_request_record_with_the_engine_prior():
    c = DraftLengthController(model({1: 0.01}))
    assert c.acceptance(None) == 0.5  # one accepted and one rejected as the engine's prior
    rec = Acceptance()
    c.observe(rec, 4, 4)
    assert (rec.accepted, rec.rejected, c.accepted, c.rejected) == (4.0, 0.0, 5.0, 1.0)
    assert c.acceptance(rec) == pytest.approx((4 + 2 * 5 / 6) / 6)
    c.observe(rec, 4, 0)
    assert (rec.accepted, rec.rejected) == (pytest.approx(3.2), 1.0)
    assert c.acceptance(rec) == pytest.approx((3.2 + 2 * 5 / 7) / (4.2 + 2))
    c.idle(rec)
    assert (rec.accepted, rec.rejected) == (pytest.approx(3.04), pytest.approx(0.95))


def test_a_kind_of_draft_moves_the_estimate_by_its_odds_against_the_engines():
    c = DraftLengthController(model({1: 0.01}))
    rec = Acceptance(kind=4)
    c.observe(rec, 4, 4)  # kind 4: 4 accepted, no rejection
    c.observe(Acceptance(kind=1), 4, 0)  # kind 1: 0 accepted, one rejection
    c.observe(Acceptance(), 2, 1)  # no kind: the engine's counts only
    assert c.kinds == {4: [4.0, 0.0], 1: [0.0, 1.0]}
    assert (c.accepted, c.rejected) == (6.0, 3.0)
    prior = 6 / 9
    a = (4 + 2 * prior) / (4 + 2)  # the request's own estimate
    assert c.acceptance(rec) == c.acceptance(rec, None) == c.acceptance(rec, 2) == pytest.approx(a)  # 2: unseen

    def odds(x: float) -> float:
        return x / (1 - x)

    for kind, (acc, rej) in ((4, (4, 0)), (1, (0, 1))):
        ak = (acc + 2 * prior) / (acc + rej + 2)
        got = c.acceptance(rec, kind)
        assert odds(got) == pytest.approx(odds(a) * odds(ak) / odds(prior))
    assert c.acceptance(rec, 1) < a < c.acceptance(rec, 4) < 1.0
    assert c.acceptance(None, 1) < prior < c.acceptance(None, 4)


def test_memory_bound_steps_keep_every_draft_token():
    c = DraftLengthController(model({1: 0.010, 64: 0.010}))
    assert c.choose(2, [(0.5, 3), (0.9, 4)]) == [3, 4]


def test_compute_bound_steps_keep_no_draft_token():
    c = DraftLengthController(model({1: 0.010, 16: 0.160}))  # time in proportion to tokens
    assert c.choose(16, [(0.95, 4)] * 16) == [0] * 16


def test_lengths_maximise_expected_tokens_per_second():
    # 10 ms a step of one token, 2 ms each token more; rates by positions kept n at acceptance 0.9:
    # 1/.010=100, 1.9/.012=158.3, 2.71/.014=193.6, 3.439/.016=214.9, 4.0951/.018=227.5; at 0.6: 100, 133.3,
    # 140.0, 136.0
    c = DraftLengthController(model({1: 0.010, 2: 0.012, 3: 0.014}))
    assert c.step_time.line(1) == pytest.approx((0.010, 0.002))
    assert c.choose(1, [(0.9, 4)]) == [4]
    assert c.choose(1, [(0.6, 4)]) == [2]
    # the most probable positions across requests first: 0.6, 0.36 of the first, then 0.3 of the second
    # (1 + 0.6 + 0.36 + 0.3 = 2.26 tokens / 16 ms = 141.25, the best), before 0.216 of the first
    assert c.choose(1, [(0.6, 4), (0.3, 4)]) == [2, 1]


def test_the_cost_of_a_position_is_read_from_a_line_through_the_counts_near_the_step():
    """Measured at batch 16 on chat prompts: 16 rows 25 ms (often), 20 rows 29.6 ms, and a step of 12
    rows seen once at 24.7 ms (four requests had just finished; the real cost is ~20 ms). Read off the
    curve, 13-16 rows cost what 12 did, so drafts at 0.5 acceptance looked free; the line through the
    counts near 12 (the one seen once weighs little) prices a position at ~1 ms, 5% of the step."""
    m = model({})
    for _ in range(9):
        m.observe(16, 0.025)
    for _ in range(5):
        m.observe(20, 0.0296)
    m.observe(12, 0.0247)
    assert m.estimate(14) - m.estimate(12) == pytest.approx(0.00015)  # the curve: two rows nearly free
    t, per_row = m.line(12)
    assert 0.0205 < t < 0.0220 and 0.00095 < per_row < 0.00110
    c = DraftLengthController(m)
    assert c.choose(12, [(0.5, 4)] * 4) == [0] * 4  # 0.5 / 12 of the tokens for 4.7% of the time: no
    assert c.choose(12, [(0.7, 4)] * 4) == [1] * 4  # 0.7 / 12 = 5.8% for 4.7%: the first position
    assert c.choose(12, [(0.95, 4)] * 4) == [4] * 4
    # one count alone has no slope to read: a token more costs in proportion
    assert model({16: 0.032}).line(16) == pytest.approx((0.032, 0.002))
    assert model({16: 0.032}).line(20) == pytest.approx((0.040, 0.002))


def test_counts_seen_often_are_priced_by_their_own_times():
    """Batch 16 on Zen 4 (AVX-512 GEMM tiles of 4 rows): the 17th row starts a tile that reads every
    weight again, so 17 rows cost 2.6 ms more than 16 and each row after ~0.9 ms. The line through
    those counts (1.1 ms a row) would take one sure position for a gain (16.95 / 26.2 ms against 16 /
    25.1); the measured 26.9 ms says it loses (16.95 / 26.9 against 16 / 24.3). Four positions or more
    share the new tile and pay."""
    m = model({})
    for n, t, seen in ((16, 0.0243, 6), (17, 0.0269, 5), (18, 0.0276, 4), (20, 0.0297, 5), (24, 0.0332, 4)):
        for _ in range(seen):
            m.observe(n, t)
    t0, per_row = m.line(16)
    assert (16 + 0.95) / (t0 + per_row) > 16 / t0  # what the line alone would say
    assert m.costs(16, 4)[:3] == [0.0243, 0.0269, 0.0276] and m.costs(16, 4)[4] == 0.0297
    assert m.costs(16, 4)[3] == pytest.approx(t0 + 3 * per_row)  # 19 rows: never seen, from the line
    c = DraftLengthController(m)
    assert c.choose(16, [(0.95, 1)]) == [0]
    assert c.choose(16, [(0.95, 4)] * 2) == [4, 4]
    # past 128 tokens counts share buckets of 32: a bucket's average never prices a position (it would be free)
    big = model({})
    for _ in range(5):
        big.observe(128, 0.080)
        big.observe(170, 0.100)  # bucket 160
    secs = big.costs(160, 4)
    assert all(b > a for a, b in zip(secs, secs[1:]))


def test_one_observed_count_takes_its_slope_from_every_step():
    """A batch-1 engine that has run one decode step knows no slope: in proportion (compute-bound) no
    draft would ever pay, and a draft model's requests never probe, so none would ever be measured. The
    every-step times (a 40-token prompt chunk: 1 ms a token) give the slope until verify steps are seen."""
    c = DraftLengthController(model({1: 0.010}))
    assert c.choose(1, [(0.9, 4)]) == [0]  # 1.9 tokens / 20 ms against 1 / 10 ms
    c.any_step_time = model({1: 0.010, 40: 0.049})
    assert c.step_time.line(1, c.any_step_time) == pytest.approx((0.010, 0.001))
    assert c.choose(1, [(0.9, 4)]) == [4]


def test_before_any_timed_step_drafts_are_kept_whole():
    assert DraftLengthController().choose(3, [(0.1, 2), (0.2, 5)]) == [2, 5]


def test_config_adaptive_flag():
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).adaptive is True
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2, "adaptive": false}').adaptive is False
    with pytest.raises(InvalidRequestError, match="adaptive must be true or false"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "adaptive": 1})


def test_a_draft_models_forwards_count_in_the_step_time():
    """Memory-bound target (10 ms whatever its tokens): free drafts are kept whole; a draft forward of
    2 ms still pays for 4 positions (3.36 tokens / 18 ms), one of 5 ms for 2 (2.44 / 20 ms beats 2.95 /
    25 ms); two requests share each forward, so at 5 ms both keep 2 (4.88 tokens / 20 ms)."""
    c = DraftLengthController(model({1: 0.010, 64: 0.010}))
    assert c.choose(1, [(0.8, 4)]) == [4]
    assert c.choose(1, [(0.8, 4)], model({1: 0.002, 64: 0.002})) == [4]
    assert c.choose(1, [(0.8, 4)], model({1: 0.005, 64: 0.005})) == [2]
    assert c.choose(2, [(0.8, 4), (0.8, 4)], model({1: 0.005, 64: 0.005})) == [2, 2]


def test_a_request_left_without_drafts_probes_one_token_after_a_while():
    c = DraftLengthController(model({1: 0.010}))
    rec = Acceptance()
    for _ in range(c.PROBE_AFTER - 1):
        c.idle(rec)
    assert not c.probe(rec)
    c.idle(rec)
    assert c.probe(rec) and rec.idle_steps == c.PROBE_AFTER
    c.observe(rec, 1, 0)  # the probe's verify result
    assert rec.idle_steps == 0 and not c.probe(rec)


def test_probes_wait_longer_where_a_position_costs_what_a_token_does():
    """Memory-bound (a position costs ~nothing): PROBE_AFTER. Compute-bound, 16 requests: a position
    costs 1/16 of the step, so 16 requests probing every 100 steps cost PROBE_SHARE (1%) of the time."""
    c = DraftLengthController(model({1: 0.010, 64: 0.011}))
    assert c.probe_interval(1, 1) == c.PROBE_AFTER == 32
    c = DraftLengthController(model({1: 0.010, 64: 0.640}))  # 10 ms a token
    assert c.probe_interval(16, 16) == 100 and c.probe_interval(16, 4) == 32
    rec = Acceptance(idle_steps=99)
    assert not c.probe(rec, 100) and c.probe(rec) and c.probe(Acceptance(idle_steps=100), 100)
    assert DraftLengthController().probe_interval(16, 16) == 32  # nothing measured yet


def test_a_prior_stands_in_until_the_first_observation():
    m = StepTimeModel(prior=lambda n: 0.001 * n)
    assert m.empty and m.estimate(4) == pytest.approx(0.004)
    m.observe(4, 0.010)
    assert m.estimate(8) == pytest.approx(0.020)  # then what was observed counts,
    assert m.estimate(1) == pytest.approx(0.001)  # and the prior below it where it says less
    assert m.estimate(4) == pytest.approx(0.010)
    m.observe(1, 0.0005)
    assert m.estimate(1) == pytest.approx(0.0005)


def test_a_first_drafts_upfront_cost_is_counted_once():
    """A draft model's prefill of a prompt it has not seen (spread over the request's tokens by the
    proposer) is charged with the request's first position: 50 ms buys no draft (3.36 tokens / 60 ms
    against 1 / 10 ms), 1 ms buys the whole one."""
    c = DraftLengthController(model({1: 0.010, 64: 0.010}))
    assert c.choose(1, [(0.8, 4)], None, [0.050]) == [0]
    assert c.choose(1, [(0.8, 4)], None, [0.001]) == [4]
