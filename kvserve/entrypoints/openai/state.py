"""OpenAIServingState: what the endpoint handlers need, kept on `app.state.serving`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from kvserve.entrypoints.openai.errors import APIError
from kvserve.entrypoints.openai.metrics import Metrics
from kvserve.entrypoints.openai.stats import StepHistory
from kvserve.loader.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvserve.distributed.data_parallel import DataParallelEngine
    from kvserve.engine.async_engine import AsyncLLMEngine


@dataclass
class OpenAIServingState:
    engine: AsyncLLMEngine | DataParallelEngine
    served_model_name: str
    metrics: Metrics
    tokenizer: Tokenizer
    max_model_len: int
    api_key: str | None = field(default=None, repr=False)
    metrics_public: bool = False  # /metrics and /stats without the API key
    steps: StepHistory = field(default_factory=StepHistory)  # recent engine steps, for /stats
    _ids_issued: int = field(default=0, init=False, repr=False)

    def new_id(self, prefix: str) -> str:
        """A response id: random, plus a per-app serial number."""
        self._ids_issued += 1
        return f"{prefix}-{secrets.token_hex(8)}{self._ids_issued}"

    def check_model(self, name: str | None) -> None:
        """404 for a request naming a model other than the served one (no name: the served one)."""
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist (served: {self.served_model_name!r})", "model",
                           "model_not_found")


def get_state(request: Request) -> OpenAIServingState:
    return request.app.state.serving
