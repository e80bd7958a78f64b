"""Plain ASGI middleware of the HTTP app: refusals decided from the request line and headers alone (size of
the header block, framing, API key, route, Content-Length), the bounded body read, refusal while draining, and
per-route Prometheus metrics.

Order, outermost first: RequestMetrics, CORS, Drain, RequestGate, BodyLimit, the app. A request the gate refuses
is answered before a byte of its body is asked for (a client sending ``Expect: 100-continue`` never sends it) and
its connection is closed, so an unauthenticated client costs a header parse, whatever body it sends.

Plain ASGI rather than ``@app.middleware("http")``, which costs an extra task and memory streams per request.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import JSONResponse
from starlette.routing import Match

__all__ = ["BodyLimit", "Drain", "Lifecycle", "Metrics", "RequestGate", "RequestMetrics", "key_refusal"]

# Labels are the route template and the status only, so their values are bounded whatever clients send
# (made-up methods, ids, paths: an unknown path is the route "unmatched").
CLOSE = (b"connection", b"close")
RETRY_AFTER_S = 1  # what a 503 of a draining server tells clients (another replica is up, or this one soon)
KEY_REFUSED = "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)"
HEADER_OVERHEAD = 4  # ": " and CRLF per header line, as sent


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
    """What the server process tells the app: ``draining`` once a SIGTERM has arrived; :meth:`expire` when the
    drain is over, which answers every request still in flight 503 (see :class:`Drain`)."""

    draining: bool = False
    in_flight: set[asyncio.Task] = field(default_factory=set)

    def expire(self) -> int:
        """Cancel the requests still in flight (each is answered 503 + Retry-After); how many there were."""
        self.draining = True
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel("the drain is over")
        return len(tasks)


async def _answer(
    send: Callable, status: int, detail: str, scope: dict, receive: Callable, headers: dict | None = None
) -> None:
    """A ``{"detail": ...}`` answer that closes the connection (what is left of the request is not read)."""
    response = JSONResponse({"detail": detail}, status_code=status, headers={**(headers or {}), "connection": "close"})
    await response(scope, receive, send)


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def key_refusal(headers: Iterable[tuple[bytes, bytes]], expected: str) -> tuple[int, str] | None:
    """None when the headers carry the API key ``expected`` (as X-API-Key, else Authorization: Bearer), else the
    refusal's (status, detail): 400 for several X-API-Key or Authorization headers, 401 for a missing or wrong key."""
    headers = list(headers)
    keys, auths = _values(headers, b"x-api-key"), _values(headers, b"authorization")
    if len(keys) > 1 or len(auths) > 1:
        return 400, "several X-API-Key or Authorization headers: send the API key once"
    key = keys[0] if keys else None
    if key is None and auths and auths[0][:7].lower() == b"bearer ":
        key = auths[0][7:]
    if key is None or not hmac.compare_digest(key, expected.encode()):
        return 401, KEY_REFUSED
    return None


def _header_bytes(scope: dict) -> int:
    """Size of the request line and header block as sent (give or take optional whitespace)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in scope["headers"])


def _framing_refusal(headers: list[tuple[bytes, bytes]]) -> str | None:
    lengths = _values(headers, b"content-length")
    if lengths and _values(headers, b"transfer-encoding"):
        return "both Content-Length and Transfer-Encoding sent: the body's framing is ambiguous; send one"
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        return "one Content-Length header, a decimal number, please"
    return None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    lengths = _values(headers, b"content-length")
    return bool(_values(headers, b"transfer-encoding")) or (bool(lengths) and lengths[0].strip(b"0") != b"")


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


class RequestGate:
    """Refuses from the request line and headers alone, before any of the body is read, in this order:

    - 431 for a request line and header block over ``max_header_bytes`` (however many writes it came in);
    - 400 for ambiguous framing (both Content-Length and Transfer-Encoding, several or bad Content-Lengths);
    - under ``protected`` (the API), when the app has an API key (``app.state.api_key``, read per request):
      400 for several key headers, 401 for a missing or wrong key;
    - a path or method no route takes: the app's 404 / 405, given an empty body;
    - 413 for a Content-Length over ``max_bytes``.

    A refused request's connection is closed when it announced a body (what is left of it is never read)."""

    def __init__(self, app: Any, max_header_bytes: int, max_bytes: int, protected: str = "/v1/") -> None:
        self.app, self.max_header_bytes, self.max_bytes, self.protected = app, max_header_bytes, max_bytes, protected

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await _answer(send, *refusal, scope, receive)
        if not self._routed(scope):  # the router answers 404 / 405 without the body
            return await self.app(scope, _no_body, _closing(send) if _has_body(scope["headers"]) else send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        headers = scope["headers"]
        if _header_bytes(scope) > self.max_header_bytes:
            return 431, f"request line and headers larger than this server's limit of {self.max_header_bytes} bytes"
        framing = _framing_refusal(headers)
        if framing is not None:
            return 400, framing
        expected = getattr(scope["app"].state, "api_key", None) if "app" in scope else None
        if expected and scope["path"].startswith(self.protected):
            refused = key_refusal(headers, expected)
            if refused is not None:
                return refused
        lengths = _values(headers, b"content-length")
        if lengths and int(lengths[0]) > self.max_bytes and self._routed(scope):
            return 413, f"request body larger than this server's limit of {self.max_bytes} bytes"
        return None

    @staticmethod
    def _routed(scope: dict) -> bool:
        """Whether a route of the app takes this path and method (no app in scope: assume so)."""
        router = getattr(scope.get("app"), "router", None)
        if router is None:
            return True
        return any(route.matches(scope)[0] is Match.FULL for route in router.routes)


def _closing(send: Callable) -> Callable:
    async def send_closing(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await send(message)

    return send_closing


class BodyLimit:
    """Reads the whole request body before the app sees it (the gate has let the request through), refusing:

    - 413 for any body whose bytes, as actually read, pass ``max_bytes`` (read up to the limit and no further;
      a Content-Length over it was refused by the gate);
    - 408 for a body not complete within ``timeout_s`` of the headers (a slow client).

    Each refusal closes the connection."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
                detail = f"request body larger than this server's limit of {self.max_bytes} bytes"
                return await _answer(send, 413, detail, scope, receive)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class Drain:
    """While the server drains (after SIGTERM): 503 + Retry-After for every new request, and ``Connection: close``
    on the answers of those already in flight, so clients move to another replica. When the drain is over
    (:meth:`Lifecycle.expire`, or the server cancelling what is left at shutdown), a request still in flight is
    answered 503 + Retry-After (its work is abandoned), never a 500."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        retry = {"retry-after": str(RETRY_AFTER_S)}
        if self.lifecycle.draining:
            detail = "the server is shutting down; send the request again"
            return await _answer(send, 503, detail, scope, receive, retry)
        started = False

        async def send_closing(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.lifecycle.draining:
                    message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        self.lifecycle.in_flight.add(task)
        try:
            await self.app(scope, receive, send_closing)
        except asyncio.CancelledError:
            if not self.lifecycle.draining:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            if not started:
                detail = "the server shut down before this request was answered; send it again"
                await _answer(send, 503, detail, scope, receive, retry)
        finally:
            self.lifecycle.in_flight.discard(task)


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
