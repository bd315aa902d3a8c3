"""The grammar backend adapter: kvserve's tokenizer seen by llguidance, and compiled grammars by their text."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

import llguidance as llg
from llguidance.gbnf_to_lark import any_to_lark

from kvserve.errors import InvalidRequestError
from kvserve.loader.tokenizer import Tokenizer
from kvserve.sampling_params import StructuredOutputsParams
from kvserve.structured.matcher import GrammarMatcher

logger = logging.getLogger(__name__)

# JSON is generated compactly with Python's separators: flexible whitespace lets a model spend its
# whole budget on blanks and newlines. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)


class CompiledGrammar:
    """A checked grammar and a fresh matcher of it; each request gets a copy (microseconds)."""

    def __init__(self, key: tuple[str, str], template: llg.LLMatcher, vocab_size: int, compile_s: float) -> None:
        self.key = key
        self.vocab_size = vocab_size
        self._template = template
        self.compile_s = compile_s

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.vocab_size)


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of one constraint (not yet checked); raises InvalidRequestError."""
    kind = spec.kind
    try:
        if kind == "json":
            schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            # a Lark alternative of string literals (JSON string escapes are Lark's)
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llg.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except InvalidRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - the converters raise ValueError and their own errors
        raise InvalidRequestError(f"structured outputs: invalid {kind}: {e}") from None


class GrammarBackend:
    """llguidance over one model's tokenizer; `compile` checks a constraint and caches it by its text.

    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        t0 = time.perf_counter()
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        # the tokenizers object as tokenizer.json text: llguidance reads each token's bytes from it
        self.ll_tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                            eos_token=list(tokenizer.eos_token_ids) or None)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # compile may run off the engine thread (the server pre-checks)
        self.hits = 0
        self.misses = 0
        logger.info("structured outputs: llguidance %s tokenizer view of %d tokens in %.2f s", llg.__version__,
                    self.vocab_size, time.perf_counter() - t0)

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The constraint compiled and checked against this tokenizer; raises InvalidRequestError naming the problem."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        t0 = time.perf_counter()
        text = grammar_text(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.ll_tokenizer)
        if is_error:
            raise InvalidRequestError(f"structured outputs: invalid {spec.kind}: {_first_line(messages)}")
        template = llg.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"structured outputs: invalid {spec.kind}: {_first_line([template.get_error()])}")
        compiled = CompiledGrammar(key, template, self.vocab_size, time.perf_counter() - t0)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def _first_line(messages: list[str]) -> str:
    """The compiler's message in one line: its first line and any "error: ..." detail (no source excerpts)."""
    lines = [ln.strip() for m in messages for ln in m.splitlines() if ln.strip()]
    if not lines:
        return "rejected by the grammar compiler"
    keep = [lines[0], *(ln for ln in lines[1:] if ln.startswith("error:"))]
    return " ".join(keep)[:500]
