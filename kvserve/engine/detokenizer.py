"""Incremental detokenization with stop strings.

Byte-level tokens can split a UTF-8 character, and a stop string can straddle steps. Text is
released only once the decoded window no longer ends in an incomplete character, and a
streaming consumer is held back by (longest stop string - 1) characters so it never sees
the beginning of a stop string that later matches.
"""

from __future__ import annotations

from kvserve.loader.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded as context so the first output token spaces correctly


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Append one token; returns the stop string it completed, if any."""
        if self.stopped:
            return None
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence, or nothing printable yet
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop:
            idx = self.text.find(s, max(0, before - len(s) + 1))
            if idx >= 0:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                self.stopped = True
                return s
        return None

    def flush(self) -> None:
        """At the end, release a trailing partial character as the replacement char (as decode does)."""
        if self.read_offset < len(self.ids) and not self.stopped:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: all of it when finished, else minus a possible stop-string start."""
        if finished or not self.holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]
