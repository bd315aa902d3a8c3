"""Model listing and operational endpoints: /v1/models, /health, /version, /metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from kvserve import __version__
from kvserve.entrypoints.openai.errors import error_response
from kvserve.entrypoints.openai.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Any:
    if request.app.state.ready and get_state(request).engine.alive:
        return PlainTextResponse("ok")
    return error_response(503, "not ready")


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics")
async def prom(request: Request) -> Any:
    st = get_state(request)
    st.metrics.update_gauges(st.engine.stats)
    body, ctype = st.metrics.render()
    return PlainTextResponse(body, media_type=ctype)


def _card(st) -> dict:  # noqa: ANN001 - an OpenAIServingState
    return {"id": st.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "kvserve",
            "max_model_len": st.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [_card(get_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    """One model's card (client.models.retrieve); 404 in OpenAI's envelope for any other id."""
    st = get_state(request)
    st.check_model(model_id)
    return _card(st)
