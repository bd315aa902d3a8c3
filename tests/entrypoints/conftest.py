"""Fixtures: an in-process OpenAI-compatible app over a tiny random Llama, driven through Starlette's
TestClient (a real httpx client: the official openai client runs on it unmodified); and the tiny
model's directory for live-server tests (the server itself: tests/serve_helpers.py)."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from helpers import make_tiny_hf

TINY_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.openai.app import build_app

    path = make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")
    engine = AsyncLLMEngine(LLMEngine(model=str(path), kv_cache_memory="4MiB"))
    yield build_app(engine, TINY_NAME)
    engine.shutdown()


@pytest.fixture(scope="module")
def http(tiny_app):
    with TestClient(tiny_app) as c:
        yield c


@pytest.fixture(scope="module")
def oai(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny-serve"), "llama")


STATS_KEY = "dash-key"


@pytest.fixture(scope="session")
def stats_server(tiny_dir):
    """A live server shared by the dashboard and bench tests (one start instead of two): an API key, and
    20 ms engine steps so that concurrent requests overlap in batches."""
    from serve_helpers import SLOW_STEP, TinyServer

    s = TinyServer(tiny_dir, "--api-key", STATS_KEY, pre=SLOW_STEP)
    s.headers = {"authorization": f"Bearer {STATS_KEY}"}
    yield s
    s.stop()
