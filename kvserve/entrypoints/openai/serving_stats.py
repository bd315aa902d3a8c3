"""/stats (the engine's state as JSON, for the dashboard and `kvserve bench`) and /dashboard (the page)."""

from __future__ import annotations

import weakref
from functools import cache
from importlib import resources

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from kvserve.entrypoints.openai.stats import snapshot
from kvserve.entrypoints.openai.state import get_state

router = APIRouter()


@router.get("/stats")
async def stats(request: Request, since: int = Query(0, ge=0, description="only step records with a larger `seq`")
                ) -> JSONResponse:
    """Engine gauges, request totals, latency percentiles, tokens/s, and the recent engine steps.

    Same API-key rule as /metrics. A poller passes the `last_seq` it saw as `since` to get only new steps."""
    st = get_state(request)
    return JSONResponse(snapshot(st.engine.stats, st.metrics, st.steps, since, _model_facts(st.engine.engine)))


_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its facts


def _model_facts(engine) -> tuple[int, int, object]:  # noqa: ANN001 - an LLMEngine
    """(weight bytes, parameters, the cached peaks or None), read once per engine: the peaks are
    what `kvserve roofline` measured on this machine; a server never measures them itself."""
    if engine not in _facts:
        from kvserve import roofline

        lm = engine.lm
        _facts[engine] = (lm.weight_bytes, lm.num_params, roofline.cached(engine.device))
    return _facts[engine]


@cache
def _page() -> str:
    return resources.files("kvserve.entrypoints.openai").joinpath("static/dashboard.html").read_text("utf-8")


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """The live dashboard: one static page that polls /stats (open it as /dashboard?key=API_KEY if a key is set)."""
    return HTMLResponse(_page())
