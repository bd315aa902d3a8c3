"""Speculative decoding: proposers of draft tokens, verified by the target model in the same batch.

The scheduler asks a proposer for drafts when it schedules decoding requests (`Scheduler.proposer`);
each such request is then scheduled for 1 + len(draft) tokens, the runner returns the target's token
at each of those positions, and `Scheduler.update_from_output` keeps the longest prefix of the
draft the target agrees with plus one token of the target's own (see scheduler.py). The verify and
accept code does not depend on where a draft came from:

- ngram.py: prompt lookup (method "ngram"), a lookup proposer: drafts are free, found per request;
- draft_model.py: a draft model (methods "draft_model" and "self_quant"), a BatchProposer
  (proposer.py): one draft forward per draft position over every speculating request of the step, on
  the draft's own paged KV cache. The engine builds it (it needs the memory plan's blocks).
"""

from kvserve.spec_decode.ngram import NgramProposer
from kvserve.spec_decode.stats import SpecDecodeStats

__all__ = ["NgramProposer", "SpecDecodeStats", "make_proposer"]


def make_proposer(config):  # noqa: ANN001, ANN201 - a kvserve.config.SpeculativeConfig -> a proposer
    """The lookup proposer of a resolved SpeculativeConfig (draft models: LLMEngine builds a DraftModelProposer)."""
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"speculative method {config.method!r} has no lookup proposer")  # validate() checked the name
