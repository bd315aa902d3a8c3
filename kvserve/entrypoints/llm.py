"""The offline API: LLM(model, **engine_args).generate(prompts, sampling_params).

Prompts take vLLM's forms: a string, a list of token ids, {"prompt": text} (TextPrompt),
{"prompt_token_ids": ids} (TokensPrompt), or a list of any of these.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.outputs import RequestOutput
from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]

PROGRESS_PERIOD_S = 10.0  # when stderr is not a terminal: one plain progress line at most this often


def _one_prompt(p: Any) -> str | list[int]:
    """A vLLM prompt form as the engine's str or token ids; raises InvalidRequestError."""
    if isinstance(p, dict):
        keys = set(p) & {"prompt", "prompt_token_ids"}
        extra = set(p) - keys
        if extra:
            raise InvalidRequestError(f"unsupported prompt field(s): {', '.join(sorted(map(str, extra)))}")
        if len(keys) != 1:
            raise InvalidRequestError('a prompt dict has one of "prompt" (text) or "prompt_token_ids"')
        if "prompt" in keys:
            if not isinstance(p["prompt"], str):
                raise InvalidRequestError('"prompt" is text; token ids go in "prompt_token_ids"')
            return p["prompt"]
        if not isinstance(p["prompt_token_ids"], (list, tuple)):
            raise InvalidRequestError('"prompt_token_ids" is a list of token ids')
        return list(p["prompt_token_ids"])
    return p


def _prompt_list(prompts: Any) -> list[str | list[int]]:
    """One prompt or a sequence of them, as a list."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and isinstance(prompts[0], int)):
        prompts = [prompts]
    return [_one_prompt(p) for p in prompts]


class LLM:
    """Use as `with LLM(...) as llm:` or call `llm.shutdown()` to free the engine (and parallel workers)."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(model=model, **engine_args)
        self._next_id = 0

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop parallel workers and drop the engine (weights, KV cache); safe to call twice."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def _live_engine(self) -> LLMEngine:
        if self.engine is None:
            raise InvalidRequestError("this LLM has been shut down")
        return self.engine

    def get_tokenizer(self):
        return self._live_engine().tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order. `priority`: per prompt, lower runs first."""
        engine = self._live_engine()
        prompts = _prompt_list(prompts)
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
                ids.append(engine.add_request(f"llm-{self._next_id}", p, sp))
                self._next_id += 1
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt leaves no request behind
                engine.abort_request(rid)
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
        prompts = [self._live_engine().input_processor.chat_prompt(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _drain(self, ids: set[str]) -> None:
        while self.engine.has_unfinished_requests() and any(i in self.engine.output_processor for i in ids):
            self.engine.step()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids)) if use_tqdm else None
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if progress is not None:
                        progress.update(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))
            if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                raise RuntimeError("engine idle with requests unfinished")  # an invariant, not user error
        if progress is not None:
            progress.close()
        return [done[i] for i in ids]


class _Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line at most every PROGRESS_PERIOD_S, and at the end."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.n_prompt, self.n_out = total, 0, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)

    def _rates(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"in {self.n_prompt / dt:.0f} tok/s, out {self.n_out / dt:.0f} tok/s"

    def _line(self) -> None:
        print(f"requests: {self.done}/{self.total} done, {time.perf_counter() - self.t0:.1f} s, {self._rates()}",
              file=sys.stderr, flush=True)
        self.last = time.perf_counter()

    def update(self, n_prompt: int, n_out: int) -> None:
        self.done, self.n_prompt, self.n_out = self.done + 1, self.n_prompt + n_prompt, self.n_out + n_out
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates())
            self.bar.update(1)
        elif self.done < self.total and time.perf_counter() - self.last >= PROGRESS_PERIOD_S:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()
