"""The n-gram (prompt lookup) proposer and speculative_config validation: no model."""

from __future__ import annotations

import pytest

from kvserve.config import EngineConfig, SpeculativeConfig
from kvserve.errors import InvalidRequestError
from kvserve.spec_decode import NgramProposer, SpecDecodeStats


def test_proposes_what_followed_the_longest_match():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    # "1 2 3" occurred before, followed by 4 5 6; the 1-gram "3" also occurred later, followed by 9
    assert p.propose([1, 2, 3, 4, 5, 6, 3, 9, 0, 1, 2, 3]) == [4, 5, 6]


def test_falls_back_to_shorter_ngrams_and_to_nothing():
    p = NgramProposer(k=2, min_n=1, max_n=4)
    assert p.propose([7, 8, 9, 5, 9]) == [5, 9]  # only the 1-gram "9" matches
    assert p.propose([1, 2, 3, 4]) == []  # the last token never occurred before
    assert NgramProposer(k=2, min_n=2, max_n=4).propose([7, 8, 9, 5, 9]) == []  # a 1-gram is below min_n
    assert p.propose([5]) == [] and p.propose([]) == []


def test_lookup_reports_the_length_of_the_match():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    assert p.lookup([1, 2, 3, 4, 5, 6, 3, 9, 0, 1, 2, 3]) == ([4, 5, 6], 3)
    assert p.lookup([7, 8, 9, 5, 9]) == ([5, 9], 1)
    assert p.lookup([7, 1, 2, 5, 1, 2]) == ([5, 1, 2], 2)
    assert p.lookup([1, 2, 3, 4]) == ([], 0) and p.lookup([]) == ([], 0)
    assert p.lookup([7, 8, 9, 5, 9], k=1) == ([5], 1)


def test_prefers_the_latest_match_with_a_full_continuation():
    p = NgramProposer(k=2, min_n=1, max_n=1)
    assert p.propose([4, 1, 4, 2, 3, 4]) == [2, 3]  # latest "4" followed by two tokens
    assert p.propose([4, 1, 5, 4]) == [1, 5]
    # the latest match "4" at index 3 is followed by one token only: the earlier one with two wins
    assert p.propose([4, 7, 8, 4, 4]) == [7, 8]
    assert p.propose([9, 9, 9]) == [9, 9]  # overlapping matches are fine


def test_k_cap_and_short_continuations():
    p = NgramProposer(k=4, min_n=1, max_n=2)
    seq = [1, 2, 3, 1, 2]
    assert p.propose(seq) == [3, 1, 2]  # 3 tokens follow the 2-gram "1 2" before the sequence ends
    assert p.propose(seq, k=2) == [3, 1]
    assert p.propose(seq, k=9) == [3, 1, 2]  # never more than the proposer's k
    assert p.propose(seq, k=0) == []


def test_matches_a_brute_force_reference():
    import random

    rng = random.Random(0)

    def brute(seq: list[int], k: int, lo: int, hi: int) -> list[int]:
        for n in range(min(hi, len(seq) - 1), lo - 1, -1):
            tail = seq[-n:]
            follows = [i + n for i in range(len(seq) - n) if seq[i:i + n] == tail]
            if follows:
                full = [j for j in follows if j + k <= len(seq)]
                j = full[-1] if full else follows[-1]
                return seq[j:j + k]
        return []

    for _ in range(500):
        seq = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        k, lo = rng.randrange(1, 5), rng.randrange(1, 3)
        hi = rng.randrange(lo, 5)
        assert NgramProposer(k, lo, hi).propose(seq) == brute(seq, k, lo, hi), (seq, k, lo, hi)


def test_config_parses_dicts_and_json_and_rejects_bad_ones():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 5, 3, 1)
    resolved = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2}).resolve()
    assert resolved.speculative_config == SpeculativeConfig("ngram", 2)
    assert resolved.resolve().speculative_config == resolved.speculative_config  # idempotent
    assert EngineConfig().resolve().speculative_config is None
    bad = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ngram"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 2}, "needs a method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
         "prompt_lookup_min (3) must be <= prompt_lookup_max (2)"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel": 1}, "unknown field"),
    ]
    for value, msg in bad:
        with pytest.raises(InvalidRequestError, match=None) as e:
            EngineConfig(speculative_config=value).resolve()
        assert msg in str(e.value), (value, str(e.value))
    with pytest.raises(InvalidRequestError, match="tensor or pipeline parallelism"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2},
                     tensor_parallel_size=2).resolve()


def test_cli_flag_reaches_the_engine_config():
    from kvserve.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(
        ["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'])
    cfg = EngineConfig.from_kwargs(**engine_kwargs(args)).resolve()
    assert cfg.speculative_config == SpeculativeConfig("ngram", 4)
    assert EngineConfig.from_kwargs(**engine_kwargs(build_parser().parse_args(["serve"]))).resolve() \
        .speculative_config is None


def test_stats_rates():
    s = SpecDecodeStats()
    assert s.acceptance_rate == 0.0 and s.mean_accepted_length == 0.0
    s.observe(4, 2)
    s.observe(2, 0)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 6, 2)
    assert s.accepted_per_pos == [1, 1, 0, 0]
    assert s.acceptance_rate == pytest.approx(2 / 6) and s.mean_accepted_length == pytest.approx(2.0)


def test_data_parallel_stats_take_ratios_of_the_summed_counters():
    from types import SimpleNamespace

    from kvserve.distributed.data_parallel import DataParallelEngine

    def replica(drafts: int, drafted: int, accepted: int) -> SimpleNamespace:
        s = SpecDecodeStats()
        for _ in range(drafts):
            s.observe(drafted // drafts, accepted // drafts)
        return SimpleNamespace(stats={"kv_cache_usage_perc": 0.5, "kv_internal_waste_perc": 0.0, **s.as_dict()})

    dp = DataParallelEngine.__new__(DataParallelEngine)
    dp.replicas = [replica(2, 8, 8), replica(1, 4, 0)]
    dp.router = SimpleNamespace(routed=[0, 0], prefix_routed=[0, 0])
    st = dp.stats
    assert st["spec_decode_num_draft_tokens"] == 12 and st["spec_decode_num_accepted_tokens"] == 8
    assert st["spec_decode_acceptance_rate"] == pytest.approx(8 / 12)
    assert st["spec_decode_mean_accepted_length"] == pytest.approx(1 + 8 / 3)
