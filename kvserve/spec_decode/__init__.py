"""Speculative decoding: proposers of draft tokens, verified by the target model in the same batch.

The scheduler asks a proposer for a draft when it schedules a decoding request (`Scheduler.proposer`);
the request is then scheduled for 1 + len(draft) tokens, the runner returns the target's token
at each of those positions, and `Scheduler.update_from_output` keeps the longest prefix of the
draft the target agrees with plus one token of the target's own (see scheduler.py).
"""

from kvserve.spec_decode.ngram import NgramProposer
from kvserve.spec_decode.stats import SpecDecodeStats

__all__ = ["NgramProposer", "SpecDecodeStats", "make_proposer"]


def make_proposer(config):  # noqa: ANN001, ANN201 - a kvserve.config.SpeculativeConfig -> a proposer
    """The proposer of a resolved SpeculativeConfig."""
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"unknown speculative method {config.method!r}")  # SpeculativeConfig.validate checked it
