"""Fixtures for live-server tests (the server itself: tests/serve_helpers.py)."""

from __future__ import annotations

import pytest

from helpers import make_tiny_hf


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny-serve"), "llama")
