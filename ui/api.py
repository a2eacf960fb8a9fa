"""Prism's HTTP API on the app's own server, beside the Gradio UI: OpenAI's images endpoints (/v1/...),
`GET /health` and `GET /metrics`, behind the access rules of api_access.py.

It is installed on the FastAPI app that Gradio's `launch()` builds and serves, rather than mounting Gradio
inside an app of ours, because `launch()` is what opens `--share` links (and serves the `--auth` login page
and Gradio's queue as the UI tests know them); a server of our own would have to re-create the tunnel.
Gradio's login does not cover these routes: api_access.py decides who may call them.
"""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api_access import ApiAccess, ApiAccessMiddleware
from .health import readiness
from .metrics import CONTENT_TYPE, PrismMetrics
from .openai_api import OpenAIImages
from .service import PrismService


def mount_api(app: Any, service: PrismService, access: ApiAccess) -> PrismMetrics:
    """Add the API to `app` (a started Starlette/FastAPI app, e.g. what `gr.Blocks.launch` returns)."""
    metrics = PrismMetrics(service)
    # Outermost, so Gradio's CORS layer never answers for the API. Starlette builds its middleware stack on
    # the first request (`launch` has made one to check its own URL) and reads this attribute per request;
    # the routes are added only after, so no request reaches them unguarded.
    app.middleware_stack = ApiAccessMiddleware(app.middleware_stack or app.build_middleware_stack(), access)

    async def health(request: Request) -> Response:
        ready = readiness(service)
        return JSONResponse(ready.to_dict(service), status_code=200 if ready.ready else 503)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    images = OpenAIImages(service, count=metrics.count_request)
    app.router.routes.extend([Route("/health", health, methods=["GET"]),
                              Route("/metrics", metrics_text, methods=["GET"]), *images.routes()])
    return metrics
