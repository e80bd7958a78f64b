"""The HTTP service (FastAPI): influence, self-influence, examples, run metadata, health and metrics.

Heavy state (Task, checkpoint models, store, index) is loaded once in ``lifespan``; gradient and
search work runs in worker threads so the event loop never blocks. A client's mistake is a 4xx whose
``detail`` says what is wrong; only a server bug is a 5xx.
"""

from __future__ import annotations

import hmac
import os
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from gradstore.projection import GradstoreError
from gradstore.store import CheckpointNotFoundError, UnknownExampleError

from .config import RunConfig, ServerConfig
from .engine import QueryEngine, QueryError
from .schemas import ErrorResponse, InfluenceRequest, InfluenceResponse, SelfInfluenceRequest, SelfInfluenceResponse

API_KEY_ENV = "GRADSTORE_API_KEY"


class Metrics:
    """Prometheus metrics of one app (its own registry: no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gradstore_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("gradstore_request_seconds", "HTTP request latency", ["route"], registry=self.registry)
        self.gradient = Histogram("gradstore_gradient_seconds", "query gradient time per request", registry=self.registry)
        self.search = Histogram("gradstore_search_seconds", "index search time per request", registry=self.registry)


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


class Measure:
    """Request count and latency per route and status, as plain ASGI (``@app.middleware("http")`` would cost an
    extra task and memory streams per request)."""

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


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool,
# one thread hop per dependency per request (three per influence call, on top of the engine's own).
async def _engine(request: Request) -> QueryEngine:
    engine = request.app.state.engine
    if engine is None:
        raise HTTPException(503, "the query engine is still loading")
    return engine


async def _settings(request: Request) -> ServerConfig:
    return request.app.state.settings


async def _check_api_key(
    request: Request, key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))]
) -> None:
    expected = request.app.state.api_key
    if expected is None:
        return
    if key is None:
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else None
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")


Engine = Annotated[QueryEngine, Depends(_engine)]
Settings = Annotated[ServerConfig, Depends(_settings)]


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the 4xx/5xx answers a route gives (all carry ``{"detail": ...}``)."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in described.items()}


api = APIRouter(
    prefix="/v1",
    dependencies=[Depends(_check_api_key)],
    responses=_errors({
        400: "the body could not be read (e.g. not UTF-8)",
        401: "missing or wrong API key (when the server has one)",
        413: "request body larger than the server's limit",
        422: "invalid request: the message names the field or says what is wrong",
        503: "the query engine is still loading",
    }),
)


def _limit(settings: ServerConfig, top_k: int, n_queries: int | None = None) -> None:
    if top_k > settings.max_top_k:
        raise HTTPException(422, f"top_k={top_k} is above this server's limit of {settings.max_top_k}")
    if n_queries is not None and n_queries > settings.max_queries:
        raise HTTPException(422, f"{n_queries} queries in one request; this server's limit is {settings.max_queries}")


async def _answer(call: Callable[[], Any]) -> Any:
    """Run engine work in a thread; turn the engine's typed errors into 4xx with their message."""
    try:
        return await run_in_threadpool(call)
    except (QueryError, CheckpointNotFoundError) as exc:
        raise HTTPException(422, str(exc)) from exc
    except UnknownExampleError as exc:
        raise HTTPException(404, str(exc)) from exc


@api.post("/influence", response_model=InfluenceResponse, summary="Top proponents and opponents of query examples")
async def influence(body: InfluenceRequest, engine: Engine, settings: Settings, request: Request) -> InfluenceResponse:
    if (body.queries is None) == (body.vectors is None):
        raise HTTPException(422, "give exactly one of `queries` (payloads) or `vectors` (precomputed gradients)")
    n = len(body.queries if body.queries is not None else body.vectors)
    if n == 0:
        raise HTTPException(422, "`queries` (or `vectors`) must not be empty")
    _limit(settings, body.top_k, n)
    response: InfluenceResponse = await _answer(
        lambda: engine.influence(
            body.queries, vectors=body.vectors, top_k=body.top_k, lr_weighting=body.lr_weighting,
            checkpoints=body.checkpoints, measurement=body.measurement, normalize=body.normalize,
        )
    )
    metrics: Metrics = request.app.state.metrics
    metrics.gradient.observe(response.timings_ms["gradient"] / 1e3)
    metrics.search.observe(response.timings_ms["search"] / 1e3)
    return response


@api.post("/self-influence", response_model=SelfInfluenceResponse, summary="Training examples with the largest self-influence")
async def self_influence(body: SelfInfluenceRequest, engine: Engine, settings: Settings) -> SelfInfluenceResponse:
    _limit(settings, body.top_k)
    return await _answer(lambda: engine.self_influence(body.top_k, body.lr_weighting, body.checkpoints))


@api.get("/examples/{example_id}", summary="The Task's description of a training example", responses=_errors({404: "no training example with that id"}))
async def example(example_id: int, engine: Engine) -> dict[str, Any]:
    return await _answer(lambda: {"id": example_id, "example": engine.describe(example_id)})


@api.get("/run", summary="Run metadata: checkpoints, lrs, projection, index kind, N, D")
async def run(engine: Engine) -> dict[str, Any]:
    return engine.run_info()


ops = APIRouter()


@ops.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", summary="Readiness: the engine is loaded", responses={503: {"description": "the engine is still loading"}})
async def readyz(request: Request) -> JSONResponse:
    ready = request.app.state.engine is not None
    return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)


@ops.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@ops.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(resources.files("gradstore.server").joinpath("static/dashboard.html").read_text())


def create_app(
    config: RunConfig | None = None, engine: QueryEngine | None = None, settings: ServerConfig | None = None
) -> FastAPI:
    """The app for a run config (engine loaded at startup) or an already built engine (tests, embedding)."""
    if config is None and engine is None:
        raise ValueError("create_app needs a run config or an engine")
    settings = settings or (config.server if config is not None else ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.engine is None:
            from .jobs import open_engine, serving_threads

            serving_threads(config)  # this process serves queries: no OpenMP team per small op on CPU
            app.state.engine = await run_in_threadpool(open_engine, config)
        yield

    app = FastAPI(
        title="gradstore",
        summary="Training-data attribution: which training examples made the model say this?",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    app.state.metrics = Metrics()
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # inside CORS: a 413 still carries its headers
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    app.add_middleware(Measure, metrics=app.state.metrics)  # outermost: counts 413s and CORS answers too

    @app.exception_handler(GradstoreError)
    async def gradstore_error(request: Request, exc: GradstoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422 if isinstance(exc, ValueError) else 500)

    app.include_router(api)
    app.include_router(ops)
    return app
