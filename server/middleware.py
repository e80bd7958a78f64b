"""Plain ASGI middleware of the HTTP app: the request body limit and per-route Prometheus metrics.

Plain ASGI rather than ``@app.middleware("http")``, which costs an extra task and memory streams per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import JSONResponse

__all__ = ["BodyLimit", "Metrics", "RequestMetrics"]


class Metrics:
    """Prometheus metrics of one app (its own registry: no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("gradstore_requests", "HTTP requests", ["route", "method", "status"], registry=registry)
        self.latency = Histogram("gradstore_request_seconds", "HTTP request latency", ["route"], registry=registry)
        self.gradient = Histogram("gradstore_gradient_seconds", "query gradient time per request", registry=registry)
        self.search = Histogram("gradstore_search_seconds", "index search time per request", registry=registry)


class BodyLimit:
    """413 for a request body over ``max_bytes``: by its Content-Length before reading anything, and by
    counting the bytes of a body sent without one (chunked), which is read up to the limit and no further."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        detail = f"request body larger than this server's limit of {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


class RequestMetrics:
    """Request count and latency per route and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router records the matched route in scope
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
