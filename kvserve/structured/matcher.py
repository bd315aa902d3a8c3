"""A request's grammar state, and the batch's token masks."""

from __future__ import annotations

import llguidance as llg
import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor: llg.LLExecutor | None = None  # fills several rows' masks in parallel (Rust threads)


class GrammarMatcher:
    """Which tokens may come next; advanced by the tokens a request appends.

    Invariant: `num_tokens` == the request's output tokens (the scheduler's post-step update keeps
    it; preemption keeps a request's output tokens, so its matcher stays as it is)."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size  # the mask's width: the grammar backend's vocabulary
        self.num_tokens = 0

    def accept(self, token_id: int) -> bool:
        """Consume one token; False (and the matcher unusable) if the grammar does not allow it."""
        ok = self._m.consume_token(token_id)
        if ok:
            self.num_tokens += 1
        return ok

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted (rejected speculative tokens, a recompute from an earlier point)."""
        if not 0 <= num_tokens <= self.num_tokens or not self._m.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback of {num_tokens} tokens failed: {self._m.get_error()}")
        self.num_tokens -= num_tokens

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (possibly none)."""
        return list(self._m.compute_ff_tokens())

    @property
    def is_done(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS): the request can stop now."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit j of word w = token 32w + j) into `row`."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


def token_bitmasks(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """[len(matchers), ceil(vocab / 32)] int32: bit t % 32 of word t / 32 set where a row's grammar
    allows token t next (several rows are filled in parallel by llguidance's executor)."""
    global _executor
    k, words = len(matchers), (matchers[0].vocab_size + 31) // 32
    bits = torch.zeros(k, words, dtype=torch.int32)
    if k == 1:
        matchers[0].fill(bits[0])
    else:
        if _executor is None:
            _executor = llg.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], bits.data_ptr(), words * 4, k)
    return bits


def token_masks(matchers: list[GrammarMatcher], width: int, bits: torch.Tensor | None = None) -> torch.Tensor:
    """[len(matchers), width] bool on the CPU: True where a row's grammar allows the token (width: the
    logits'); `bits`: the rows' token_bitmasks if already computed."""
    bits = token_bitmasks(matchers) if bits is None else bits
    k, words = bits.shape
    allowed = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).view(k, words * 32)[:, :width].bool()
    if allowed.shape[1] < width:  # logits wider than the grammar's vocabulary: the rest is never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(k, width - allowed.shape[1])], dim=1)
    return allowed
