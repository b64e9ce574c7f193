"""``GET /metrics`` (Prometheus text format) and the middleware that counts and times API
requests.

Registered by ``api/app.py``'s ``create_app``; the figures are ``daemon/metrics.py``'s.
The middleware is plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so streamed
responses and a client's disconnect reach the routes exactly as before; a request's
time is to its response's first byte, and its route is the matched template
(``/v1/machines/{name}``), never the raw path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Response

from ember.daemon.manager import Manager

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message],
                                                                        Awaitable[None]]],
                   Awaitable[None]]


class RequestMetrics:
    """Counts and times each HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, mgr: Manager) -> None:
        self.app = app
        self.mgr = mgr

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        metrics = getattr(self.mgr, "metrics", None)
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.request_seconds.labels(scope["method"], route).observe(
                    time.perf_counter() - start)
                metrics.requests.labels(scope["method"], route, str(status[0])).inc()
            await send(message)

        await self.app(scope, receive, sending)


def add_metrics_routes(app: FastAPI, mgr: Manager) -> None:
    app.add_middleware(RequestMetrics, mgr=mgr)

    @app.get("/metrics", tags=["system"], response_class=Response,
             responses={200: {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Per-machine state, CPU seconds, memory, storage I/O and restarts; machines by
        state; start, exec and API latency histograms; API request counts; image store
        and snapshot sizes."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        # reading /proc, the cgroups and the store's sizes blocks: off the event loop
        body = await asyncio.to_thread(generate_latest, mgr.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
