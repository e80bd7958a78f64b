"""Plain ASGI middleware of the HTTP app: request framing and body limits, refusal while draining, and per-route
Prometheus metrics.

Plain ASGI rather than ``@app.middleware("http")``, which costs an extra task and memory streams per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import JSONResponse

__all__ = ["BodyLimit", "Drain", "Lifecycle", "Metrics", "RequestMetrics"]

# Labels are the route template and the status only, so their values are bounded whatever clients send
# (made-up methods, ids, paths: an unknown path is the route "unmatched").
CLOSE = (b"connection", b"close")


class Metrics:
    """Prometheus metrics of one app (its own registry: no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("gradstore_requests", "HTTP requests", ["route", "status"], registry=registry)
        self.latency = Histogram("gradstore_request_seconds", "HTTP request latency", ["route"], registry=registry)
        self.gradient = Histogram("gradstore_gradient_seconds", "query gradient time per request", registry=registry)
        self.search = Histogram("gradstore_search_seconds", "index search time per request", registry=registry)


@dataclass
class Lifecycle:
    """What the server process tells the app: ``draining`` once a SIGTERM has arrived."""

    draining: bool = False


async def _answer(send: Callable, status: int, detail: str, scope: dict, receive: Callable) -> None:
    """A ``{"detail": ...}`` answer that closes the connection (what is left of the request is not read)."""
    response = JSONResponse({"detail": detail}, status_code=status, headers={"connection": "close"})
    await response(scope, receive, send)


class BodyLimit:
    """Reads the whole request body before the app sees it (so before any authentication work), refusing:

    - 400 for ambiguous framing (both Content-Length and Transfer-Encoding, or several Content-Lengths);
    - 413 for a Content-Length over ``max_bytes`` at once, and for any body whose bytes, as actually read,
      pass ``max_bytes`` (read up to the limit and no further);
    - 408 for a body not complete within ``timeout_s`` of the headers (a slow client).

    Each refusal closes the connection."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths = [value for name, value in scope["headers"] if name == b"content-length"]
        if lengths and any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            detail = "both Content-Length and Transfer-Encoding sent: the body's framing is ambiguous; send one"
            return await _answer(send, 400, detail, scope, receive)
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return await _answer(send, 400, "one Content-Length header, a decimal number, please", scope, receive)
        if lengths and int(lengths[0]) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                detail = f"request body not complete within {self.timeout_s:g} s"
                return await _answer(send, 408, detail, scope, receive)
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        detail = f"request body larger than this server's limit of {self.max_bytes} bytes"
        await _answer(send, 413, detail, scope, receive)


class Drain:
    """While the server drains (after SIGTERM): 503 for every new request, and ``Connection: close`` on the
    answers of those already in flight, so clients move to another replica."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            return await _answer(send, 503, "the server is shutting down; send the request again", scope, receive)

        async def send_closing(message: dict) -> None:
            if message["type"] == "http.response.start" and self.lifecycle.draining:
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)


class RequestMetrics:
    """Request count and latency per route template and status."""

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
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
