"""AsyncLLMEngine's failure isolation: one request's failure is that request's alone; a broken step
fails every open stream and queued add at once (never a hang)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helpers import TINY_VOCAB, make_tiny_hf
from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvserve.engine.llm_engine import LLMEngine
from kvserve.errors import InvalidRequestError
from kvserve.loader import load_model
from kvserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    return load_model(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture
def aengine(tiny_loaded):
    e = AsyncLLMEngine(LLMEngine(loaded=tiny_loaded, kv_cache_memory="2MiB"))
    yield e
    e.shutdown()


async def _tokens(e: AsyncLLMEngine, rid: str, prompt=PROMPT, params=GREEDY) -> list[int]:
    last = None
    async for out in e.generate(rid, prompt, params):
        last = out
    return last.outputs[0].token_ids


def _gate(e: AsyncLLMEngine, rid: str) -> tuple[threading.Event, threading.Event]:
    """Hold the engine thread inside add_request(rid) until `release` is set; `entered` tells it is there."""
    entered, release = threading.Event(), threading.Event()
    orig = e.engine.add_request

    def add(request_id, prompt, params=None, arrival_time=None):
        if request_id == rid:
            entered.set()
            release.wait(10)
        return orig(request_id, prompt, params, arrival_time)

    e.engine.add_request = add
    return entered, release


def test_cancelled_bad_request_leaves_the_loop_running(aengine):
    """The issue's crash: a request whose add raises (out-of-vocab id), cancelled by its client before the
    engine thread takes it, then a bad request cancelled while the engine handles it."""

    async def main():
        ref = await _tokens(aengine, "ref")
        entered, release = _gate(aengine, "gate")
        gate = asyncio.ensure_future(_tokens(aengine, "gate"))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        # queued behind the gate, then given up on by its client
        bad = asyncio.ensure_future(_tokens(aengine, "bad", [1, TINY_VOCAB + 99199426]))
        await asyncio.sleep(0.05)
        bad.cancel()
        # a bad request whose client goes away while the engine is inside its add_request
        entered2, release2 = _gate(aengine, "bad2")
        bad2 = asyncio.ensure_future(_tokens(aengine, "bad2", [TINY_VOCAB]))
        release.set()
        while not entered2.is_set():
            await asyncio.sleep(0.01)
        bad2.cancel()
        release2.set()
        with pytest.raises(asyncio.CancelledError):
            await bad
        with pytest.raises(asyncio.CancelledError):
            await bad2
        assert await gate == ref
        with pytest.raises(InvalidRequestError, match="out of vocabulary"):
            await _tokens(aengine, "bad3", [TINY_VOCAB])
        return ref, await asyncio.gather(*(_tokens(aengine, f"after{i}") for i in range(4)))

    ref, after = asyncio.run(main())
    assert aengine.alive and aengine.error is None
    assert after == [ref] * 4
    assert aengine.engine.kv.pool.num_used_blocks == 0 and not aengine.engine.has_unfinished_requests()


def test_a_failing_command_fails_its_request_only(aengine):
    """An unexpected exception in one request's add (not a validation error) goes to that request."""
    orig = aengine.engine.add_request

    def add(request_id, prompt, params=None, arrival_time=None):
        if request_id == "boom":
            raise RuntimeError("injected")
        return orig(request_id, prompt, params, arrival_time)

    aengine.engine.add_request = add

    async def main():
        return await asyncio.gather(_tokens(aengine, "boom"), _tokens(aengine, "ok"), return_exceptions=True)

    boom, ok = asyncio.run(main())
    assert isinstance(boom, RuntimeError) and str(boom) == "injected"
    assert isinstance(ok, list) and len(ok) == 8
    assert aengine.alive


def test_a_failing_abort_does_not_stop_the_loop(aengine):
    orig = aengine.engine.abort_request

    def abort(request_id):
        orig(request_id)
        if request_id == "dropped":
            raise RuntimeError("injected abort failure")

    aengine.engine.abort_request = abort

    async def main():
        gen = aengine.generate("dropped", PROMPT, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the client goes away: an abort command
        return await _tokens(aengine, "next")

    assert len(asyncio.run(main())) == 8
    assert aengine.alive


def test_a_broken_step_fails_every_stream_and_queued_add(aengine):
    """An invariant broken inside step(): the loop stops, open streams and the adds still queued get
    EngineDeadError (no hang), later requests are refused at once, and `error` says why."""
    orig, calls = aengine.engine.step, [0]
    inside, release = threading.Event(), threading.Event()

    def step():
        calls[0] += 1
        if calls[0] == 3:
            inside.set()
            release.wait(10)
            raise AssertionError("injected invariant")
        return orig()

    aengine.engine.step = step
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def one(rid):
        got = []
        with pytest.raises(EngineDeadError, match="injected invariant"):
            async for out in aengine.generate(rid, PROMPT, long):
                got.append(out)
        return got

    async def main():
        running = [asyncio.ensure_future(one(f"s{i}")) for i in range(3)]
        while not inside.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(one("queued"))  # its add waits behind the failing step
        await asyncio.sleep(0.05)
        release.set()
        res = await asyncio.wait_for(asyncio.gather(*running, queued), 30)
        with pytest.raises(EngineDeadError):
            await _tokens(aengine, "late")
        return res

    *streams, queued = asyncio.run(main())
    assert all(streams) and queued == []  # each open one had started; the queued one never did
    assert not aengine.alive and isinstance(aengine.error, AssertionError)
