"""Running engine requests for a handler: to completion, up to their first output, and usage counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.openai.request_log import record_of
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.distributed.data_parallel import DataParallelEngine
    from kvserve.engine.async_engine import AsyncLLMEngine

T = TypeVar("T")


DISCONNECT_POLL_S = 0.1


class ClientDisconnected(Exception):
    """The client went away before its response started; nobody reads what is returned."""


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it (its request is then aborted) as soon as the client disconnects."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def collect(engine: AsyncLLMEngine | DataParallelEngine, request: Request, rid: str, prompt: str | list[int],
                  params: SamplingParams) -> RequestOutput:
    """Non-streaming: run to completion unless the client disconnects first."""
    gen = engine.generate(rid, prompt, params)
    rec = record_of(request)

    async def consume() -> RequestOutput | None:
        last = None
        async for out in gen:
            last = out
            rec.observe(out)
        return last

    try:
        last = await unless_disconnected(request, consume())
    finally:
        await gen.aclose()
    assert last is not None
    return last


async def first_outputs(request: Request, gens: list[AsyncGenerator[RequestOutput, None]]) -> list[RequestOutput]:
    """Each stream's first output before the response starts, so that a rejected request is an
    HTTP error (via the KVServeError handler) rather than a broken stream; closes all on failure
    (the client disconnecting while its request waits or prefills included)."""
    firsts = []
    try:
        for g in gens:
            firsts.append(await unless_disconnected(request, g.__anext__()))
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
