"""Running engine requests for a handler: to completion, up to their first output, and usage counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from fastapi import Request

from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.distributed.data_parallel import DataParallelEngine
    from kvserve.engine.async_engine import AsyncLLMEngine


async def collect(engine: AsyncLLMEngine | DataParallelEngine, request: Request, rid: str, prompt: str | list[int],
                  params: SamplingParams) -> RequestOutput:
    """Non-streaming: run to completion unless the client disconnects first."""
    gen = engine.generate(rid, prompt, params)
    last: RequestOutput | None = None
    rec = record_of(request)

    async def consume() -> None:
        nonlocal last
        async for out in gen:
            last = out
            rec.observe(out)

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                break
        await task
    finally:
        if not task.done():
            task.cancel()
        await gen.aclose()
    assert last is not None
    return last


async def first_outputs(gens: list[AsyncGenerator[RequestOutput, None]]) -> list[RequestOutput]:
    """Each stream's first output before the response starts, so that a rejected request is an
    HTTP error (via the KVServeError handler) rather than a broken stream; closes all on failure."""
    firsts = []
    try:
        for g in gens:
            firsts.append(await g.__anext__())
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    return firsts


def stream_usage(body: object) -> tuple[bool, bool]:
    """(usage in a final chunk, usage on every chunk: vLLM's continuous_usage_stats) from stream_options."""
    opts = getattr(body, "stream_options", None)
    final = bool(opts and opts.include_usage)
    return final, final and opts.continuous_usage_stats


def usage_of(out: RequestOutput) -> dict:
    return usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
