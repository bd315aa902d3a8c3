"""/tokenize and /detokenize, with vLLM's request and response shapes (no engine step involved)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from kvserve.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from kvserve.entrypoints.openai.state import get_state
from kvserve.errors import InvalidRequestError

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    st = get_state(request)
    st.check_model(body.model)
    ids = await asyncio.to_thread(body.token_ids, st.tokenizer)  # a long text is not tokenized on the event loop
    strs = [st.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    st = get_state(request)
    st.check_model(body.model)
    vocab = st.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is out of vocabulary (size {vocab})")
    return {"prompt": await asyncio.to_thread(st.tokenizer.decode, body.tokens, skip_special_tokens=False)}
