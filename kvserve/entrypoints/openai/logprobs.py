"""Logprobs in the shape of each API: chat's `content` items, completions' parallel lists."""

from __future__ import annotations

from kvserve.engine.outputs import CompletionOutput, RequestOutput
from kvserve.loader.tokenizer import Tokenizer


def chat_logprobs(tokenizer: Tokenizer, c: CompletionOutput, start: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    items = []
    for lp in c.logprobs[start:]:
        tok = tokenizer.decode([lp.token_id], skip_special_tokens=False)
        items.append({"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
                      "top_logprobs": [{"token": (t := tokenizer.decode([i], skip_special_tokens=False)),
                                        "logprob": v, "bytes": list(t.encode())} for i, v in lp.top]})
    return {"content": items}


def completion_logprobs(tokenizer: Tokenizer, out: RequestOutput, c: CompletionOutput, echo: bool, k: int,
                        start: int = 0, offset0: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, tlps, tops, offsets = [], [], [], []
    pos = offset0
    entries: list[tuple[int, float | None, list]] = []
    if echo:  # the prompt's entries lead (the first chunk of a stream)
        for j, tid in enumerate(out.prompt_token_ids):
            lp = out.prompt_logprobs[j] if out.prompt_logprobs and j < len(out.prompt_logprobs) else None
            entries.append((tid, None if lp is None else lp.logprob, [] if lp is None else lp.top))
    for lp in c.logprobs[start:]:
        entries.append((lp.token_id, lp.logprob, lp.top))
    for tid, v, top in entries:
        t = tokenizer.decode([tid], skip_special_tokens=False)
        tokens.append(t)
        tlps.append(v)
        tops.append(None if v is None else {tokenizer.decode([i], skip_special_tokens=False): x for i, x in top[:k]})
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": tlps, "top_logprobs": tops, "text_offset": offsets}
