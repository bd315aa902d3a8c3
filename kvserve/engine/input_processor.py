"""From what the caller sends to Requests: validation, tokenization, chat templates, the n fan-out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.kv_cache import KVCacheManager
from kvserve.engine.output_processor import ParentRequest
from kvserve.engine.request import Request
from kvserve.errors import InvalidRequestError
from kvserve.loader.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.structured.backend import GrammarBackend


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, kv: KVCacheManager) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv = kv
        self._grammars: GrammarBackend | None = None  # built at the first constrained request

    @property
    def grammars(self) -> GrammarBackend:
        """The structured-output backend over this model's tokenizer (built once, on first use)."""
        if self._grammars is None:
            from kvserve.structured.backend import GrammarBackend

            self._grammars = GrammarBackend(self.tokenizer, self.vocab_size)
        return self._grammars

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a conversation through the model's chat template."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(the prompt text if it was text, its token ids); raises InvalidRequestError."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("a prompt is a string or a list of token ids")
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of vocabulary (size {self.vocab_size})")
        return None, list(prompt)

    def _token_limit(self, n_prompt: int, params: SamplingParams) -> int:
        """The most tokens (prompt + output) the request may reach; raises if it cannot fit at all."""
        max_len = self.max_model_len
        if params.max_tokens is not None and n_prompt + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {n_prompt + params.max_tokens} "
                f"exceeds max_model_len ({max_len})"
            )
        if n_prompt >= max_len:
            raise InvalidRequestError(f"prompt ({n_prompt} tokens) leaves no room under max_model_len ({max_len})")
        capacity = self.kv.num_blocks * self.kv.block_size
        # no max_tokens: generate up to the context limit, or what the whole cache can hold
        limit = max_len if params.max_tokens is not None else min(max_len, capacity)
        total = n_prompt + params.max_tokens if params.max_tokens is not None else limit
        if self.kv.blocks_needed(total) > self.kv.num_blocks or n_prompt >= limit:
            raise InvalidRequestError(
                f"request needs up to {total} tokens of KV cache but the whole cache holds {capacity}; "
                f"lower max_tokens or raise kv_cache_memory"
            )
        return limit

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None) -> ParentRequest:
        """The parent request and its n child Requests (each with its detokenizer); raises InvalidRequestError."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        text, ids = self.tokenize(prompt)
        for name, tokens in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:  # a negative or too-large id would index the logits out of range inside the step
                raise InvalidRequestError(f"{name}: token id {bad[0]} is out of vocabulary (size {self.vocab_size})")
        limit = self._token_limit(len(ids), params)
        # compiled (or found in the cache) and checked here, before the request can hold any KV
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs is not None else None
        eos = self.tokenizer.eos_token_ids
        children: list[Request] = []
        for i in range(params.n):
            p = params if params.n == 1 else params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            r = Request(child_id, ids, p, eos, limit, arrival_time, group_id=request_id)
            r.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens, p.stop,
                                                   p.include_stop_str_in_output)
            if grammar is not None:
                r.grammar = grammar.matcher()  # one per sample: each follows its own tokens
            if i > 0:
                r.wait_for = children[0]  # siblings share the first sample's cached prompt
            children.append(r)
        return ParentRequest(request_id, text, children)
