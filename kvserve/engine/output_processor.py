"""From requests to what the caller sees: the parent request of n samples, RequestOutput, deltas."""

from __future__ import annotations

from kvserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.engine.request import Request
from kvserve.engine.scheduler import SchedulerOutput


class ParentRequest:
    """The n samples (child requests) of one request, reported together as one RequestOutput."""

    def __init__(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.children = children
        self.sent_text = [0] * len(children)  # what earlier outputs already carried (for deltas)
        self.sent_tokens = [0] * len(children)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)

    def has_news(self) -> bool:
        """A child has tokens not yet reported."""
        return any(len(c.output_token_ids) > n for c, n in zip(self.children, self.sent_tokens))

    def make_output(self) -> RequestOutput:
        outs = []
        for i, r in enumerate(self.children):
            text = r.detokenizer.visible_text(r.is_finished) if r.detokenizer is not None else ""
            lps = r.logprobs if r.params.logprobs is not None else None
            outs.append(CompletionOutput(
                index=i,
                text=text,
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                logprobs=lps,
                cumulative_logprob=sum(lp.logprob for lp in lps) if lps else None,
                delta_text=text[self.sent_text[i]:],
                delta_token_ids=r.output_token_ids[self.sent_tokens[i]:],
            ))
            self.sent_text[i], self.sent_tokens[i] = len(text), len(r.output_token_ids)
        first = self.children[0]
        finish_times = [r.finish_time for r in self.children]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=min((r.first_scheduled_time for r in self.children if r.first_scheduled_time),
                                     default=None),
            first_token_time=min((r.first_token_time for r in self.children if r.first_token_time), default=None),
            finish_time=max(finish_times) if all(finish_times) else None,
            num_preemptions=sum(r.num_preemptions for r in self.children),
            queue_time=max(r.queue_time for r in self.children),
            num_output_tokens=sum(len(r.output_token_ids) for r in self.children),
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outs,
            finished=self.finished,
            metrics=metrics,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
        )


class OutputProcessor:
    """The parent requests not yet reported finished, and each step's outputs."""

    def __init__(self) -> None:
        self.parents: dict[str, ParentRequest] = {}
        self._parent_of: dict[str, ParentRequest] = {}  # child request id -> parent
        self._aborted: set[str] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.parents

    def __len__(self) -> int:
        return len(self.parents)

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent
        for r in parent.children:
            self._parent_of[r.request_id] = parent

    def aborted(self, request_id: str) -> None:
        """The request's children were finished by an abort: its final output goes out with the next step."""
        self._aborted.add(request_id)

    def process(self, so: SchedulerOutput) -> list[RequestOutput]:
        """One output per parent whose children got tokens this step, or that was aborted since the last."""
        touched: dict[str, ParentRequest] = {}
        for s in so.scheduled:
            parent = self._parent_of.get(s.request.request_id)
            if parent is not None and parent.request_id not in touched and parent.has_news():
                touched[parent.request_id] = parent
        for rid in self._aborted:
            parent = self.parents.get(rid)
            if parent is not None and parent.finished:
                touched[rid] = parent
        self._aborted.clear()
        outputs = [p.make_output() for p in touched.values()]
        for o in outputs:
            if o.finished:
                for r in self.parents.pop(o.request_id).children:
                    self._parent_of.pop(r.request_id, None)
        return outputs
