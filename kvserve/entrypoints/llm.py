"""The offline API: LLM(model, **engine_args).generate(prompts, sampling_params)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.outputs import RequestOutput
from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(model=model, **engine_args)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order. `priority`: per prompt, lower runs first."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if priority is not None:
            prios = [priority] * len(prompts) if isinstance(priority, int) else list(priority)
            if len(prios) != len(prompts):
                raise InvalidRequestError(f"{len(prompts)} prompts but {len(prios)} priorities")
            params = [sp.clone(priority=p) for sp, p in zip(params, prios)]
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(f"llm-{self._next_id}", p, sp))
                self._next_id += 1
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt leaves no request behind
                self.engine.abort_request(rid)
            self._drain(set(ids))
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.input_processor.chat_prompt(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _drain(self, ids: set[str]) -> None:
        while self.engine.has_unfinished_requests() and any(i in self.engine.output_processor for i in ids):
            self.engine.step()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req", dynamic_ncols=True)
        t0 = time.perf_counter()
        n_prompt = n_out = 0
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    n_prompt += len(out.prompt_token_ids)
                    n_out += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        dt = max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"in {n_prompt / dt:.0f} tok/s, out {n_out / dt:.0f} tok/s")
                        bar.update(1)
            if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                raise RuntimeError("engine idle with requests unfinished")  # an invariant, not user error
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]
