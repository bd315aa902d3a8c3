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


@router.get("/v1/models")
async def models(request: Request) -> dict:
    st = get_state(request)
    return {"object": "list", "data": [{"id": st.served_model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "kvserve", "max_model_len": st.max_model_len}]}
