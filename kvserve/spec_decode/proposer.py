"""The interface of proposers that draft for a whole step at once (a draft model), beside lookup ones.

A lookup proposer (n-gram) has `.k` and `.propose(token_ids, k)`: its drafts are free, so the scheduler
finds them first and then chooses how much of each to verify. A `BatchProposer` pays for every draft
position (one forward of a draft model over the requests drafting that far), so the scheduler chooses
each request's draft length first and then asks for all drafts of the step in one call; it keeps state
per request (a KV cache), which the scheduler releases when the request leaves the running set.
"""

from __future__ import annotations

from kvserve.engine.request import Request
from kvserve.spec_decode.adaptive import StepTimeModel


class BatchProposer:
    def __init__(self, k: int) -> None:
        self.k = k  # the longest draft
        self.draft_time = StepTimeModel()  # seconds of one draft forward by its rows (adaptive lengths read it)
        self.seconds = 0.0  # spent drafting since the engine last took it (take_seconds)

    def propose_batch(self, reqs: list[Request], lengths: list[int]) -> list[list[int]]:
        """Up to lengths[i] draft tokens to follow each request's tokens (fewer, or [], where it cannot)."""
        raise NotImplementedError

    def release(self, request_id: str) -> None:
        """Forget a request's state (finished, aborted or preempted): its draft blocks are freed."""

    def follows(self, request_id: str) -> bool:
        """Whether the proposer holds state for the request (a draft model has its prompt's K/V): only
        then is a one-token probe cheap, since a first draft costs the draft a prompt prefill."""
        return False

    def first_draft_cost(self, req: Request) -> float:
        """Seconds a request's next draft costs beyond its draft positions, charged to this step (0.0: none)."""
        return 0.0

    def take_seconds(self) -> float:
        """Seconds spent drafting since the last call: the engine takes them off the target's step time."""
        s, self.seconds = self.seconds, 0.0
        return s
