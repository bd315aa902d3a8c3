"""Structured outputs: constraints compiled to grammars (llguidance), one matcher per request.

    StructuredOutputsParams (sampling_params.py)
      --GrammarBackend.compile (cached by kind + text; errors are InvalidRequestError)--> CompiledGrammar
      --.matcher()--> GrammarMatcher on Request.grammar (one per request and per n sample)
    each step: Sampler masks the rows that have a matcher (token_masks); the scheduler's post-step
    update advances each matcher by the tokens it appends, and finishes a request whose grammar
    is complete.

Why llguidance: a Rust wheel with no Python dependencies (xgrammar needs transformers and triton
at run time), masks in ~0.2 ms per row on a 49k vocabulary, and its tokenizer view is built from
kvserve's own `tokenizers` object (GGUF or tokenizer.json), never from a hub.
"""

from kvserve.structured.backend import CompiledGrammar, GrammarBackend
from kvserve.structured.matcher import GrammarMatcher, token_masks

__all__ = ["CompiledGrammar", "GrammarBackend", "GrammarMatcher", "token_masks"]
