"""Perplexity computed the way llama.cpp's `llama-perplexity` does it.

The text (one trailing newline removed) is tokenized once, with BOS only if the model asks
for it, and cut into chunks of `ctx` tokens; the first token of each chunk becomes BOS when
the model uses one. Only the second half of each chunk is scored, so every scored token sees
at least ctx/2 tokens of context. PPL = exp(mean NLL); the error is the standard error of the
mean NLL carried through exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvserve.errors import InvalidRequestError
from kvserve.layers.attention import AttentionMetadata, allocate_kv_caches, resolve_kv_dtype
from kvserve.loader import LoadedModel


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    mean_nll: float
    num_scored: int
    num_chunks: int
    ctx: int


def prepare_text(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _paged_metadata(n_chunks: int, ctx: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """Each chunk written to its own run of cache blocks and attended through them."""
    per_seq = -(-ctx // block_size)
    tables = torch.arange(n_chunks * per_seq, dtype=torch.int32).view(n_chunks, per_seq)
    pos = torch.arange(ctx)
    slots = (tables[:, pos // block_size].long() * block_size + pos % block_size).flatten()
    meta = AttentionMetadata.for_prefill([ctx] * n_chunks, device)
    meta.slot_mapping = slots.to(device)
    meta.block_tables = tables.to(device)
    return meta


@torch.inference_mode()
def chunk_nlls(
    lm: LoadedModel, tokens: list[int], ctx: int, batch_chunks: int = 4, kv_cache_dtype: str = "none"
) -> torch.Tensor:
    """Negative log-likelihoods (float64) of every scored token, chunk after chunk.

    kv_cache_dtype "none" attends over the fresh K/V; any engine KV cache dtype ("auto", "bfloat16",
    "int8", ...) writes them to a paged cache of that kind first and attends through it, so the
    cache's precision is what is scored.
    """
    n_chunks = len(tokens) // ctx
    if n_chunks < 1 or ctx < 4:
        raise InvalidRequestError(f"text has {len(tokens)} tokens; need at least ctx={ctx} (and ctx >= 4)")
    first = ctx // 2
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.add_bos else None
    device = next(lm.model.parameters()).device
    caches = None
    if kv_cache_dtype != "none":
        kv_dtype = resolve_kv_dtype(kv_cache_dtype, lm.dtype)
        caches = allocate_kv_caches(lm.model, batch_chunks * -(-ctx // 16), 16, kv_dtype, device)
    out = []
    for c0 in range(0, n_chunks, batch_chunks):
        chunks = []
        for c in range(c0, min(n_chunks, c0 + batch_chunks)):
            chunk = tokens[c * ctx : (c + 1) * ctx]
            if bos is not None:
                chunk = [bos, *chunk[1:]]
            chunks.append(chunk)
        ids = torch.tensor([t for ch in chunks for t in ch], device=device)
        pos = torch.arange(ctx, device=device).repeat(len(chunks))
        if caches is None:
            hidden = lm.model(ids, pos, AttentionMetadata.for_prefill([ctx] * len(chunks), device))
        else:
            hidden = lm.model(ids, pos, _paged_metadata(len(chunks), ctx, 16, device), caches)
        hidden = hidden.view(len(chunks), ctx, -1)[:, first : ctx - 1]
        logits = lm.model.compute_logits(hidden).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([ch[first + 1 :] for ch in chunks], device=device)
        out.append(-logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().flatten().cpu())
    return torch.cat(out)


def perplexity(
    lm: LoadedModel, text: str, ctx: int = 512, batch_chunks: int = 4, kv_cache_dtype: str = "none"
) -> PerplexityResult:
    tokens = lm.tokenizer.encode(prepare_text(text), add_special_tokens=True)
    nll = chunk_nlls(lm, tokens, ctx, batch_chunks, kv_cache_dtype)
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll**2).mean()) - mean * mean
    stderr = math.sqrt(var / (len(nll) - 1)) * ppl if var > 0 and len(nll) > 1 else 0.0
    return PerplexityResult(ppl, stderr, mean, len(nll), len(tokens) // ctx, ctx)
