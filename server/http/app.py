"""The HTTP service (FastAPI): influence, per-token explanations, self-influence, examples, run metadata, health
and metrics.

Heavy state (Task, checkpoint models, store, index) is loaded once in ``lifespan``; gradient and
search work runs in worker threads so the event loop never blocks (with ``[server] batch_window_ms``, concurrent
influence requests share a call: ``batching.py``). Every answer that is not a 200 carries
``{"detail": ...}`` saying what is wrong: a client's mistake is a 4xx, a run the server cannot serve (stale or
missing index, ...) a 503; the status of each gradstore error comes from ``errors.HTTP_STATUS``.

Requests are refused from their headers alone where they can be (``middleware.RequestGate``: header size, framing,
API key, route, Content-Length), so an unauthenticated client's body is never read. JSON bodies are parsed and
validated strictly, in a worker thread when large: ``NaN``, ``Infinity`` and numbers beyond the float range
(``1e400``) are a 422 naming the token, request models take no coercion (``"5"`` or ``true`` is no ``top_k``), and a
422 never echoes a value JSON cannot carry. Scores that come out NaN, Inf or beyond
float32 are refused, not served as ``null``. With a run config, the run's files are watched (``watch.py``): a
rebuilt index or changed store reloads the engine, and a run that cannot be served answers 503 saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from gradstore.projection import GradstoreError
from gradstore.store import StoreCorruptError

from .. import __version__
from ..errors import ConfigError, QueryError, http_status
from ..run.config import RunConfig, ServerConfig
from ..run.engine import QueryEngine
from ..run.run import Run
from ..run.schemas import (
    ErrorResponse,
    ExampleResponse,
    ExplainRequest,
    ExplainResponse,
    InfluenceRequest,
    InfluenceResponse,
    RunInfo,
    SelfInfluenceRequest,
    SelfInfluenceResponse,
    non_finite,
)
from .batching import InfluenceBatcher
from .docs import install_docs
from .middleware import BodyLimit, Drain, Lifecycle, Metrics, RequestGate, RequestMetrics, key_refusal
from .watch import Unavailable, Watcher, run_fingerprint

__all__ = ["API_KEY_ENV", "create_app"]

API_KEY_ENV = ServerConfig.model_config["env_prefix"] + "API_KEY"  # read by ServerConfig (pydantic-settings)


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool,
# one thread hop per dependency per request (three per influence call, on top of the engine's own).
async def _engine(request: Request) -> QueryEngine:
    unavailable: Unavailable | None = request.app.state.unavailable
    if unavailable is not None:
        raise HTTPException(unavailable.status, unavailable.message)
    engine = request.app.state.engine
    if engine is None:
        raise HTTPException(503, "the query engine is still loading")
    return engine


async def _settings(request: Request) -> ServerConfig:
    return request.app.state.settings


async def _check_api_key(
    request: Request, key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))]
) -> None:
    """The API key, checked again (``middleware.RequestGate`` refuses before the body is read; this dependency
    also puts the key in the OpenAPI schema)."""
    expected = request.app.state.api_key
    if expected is None:
        return
    refused = key_refusal(request.headers.raw, expected)
    if refused is not None:
        raise HTTPException(*refused)


# -- strict JSON bodies -------------------------------------------------------------------------------------

# A literal that may not fit a float64: an exponent of 3+ digits, or 300+ digits in a row (the look-behind keeps the
# search linear: a run of digits is tried once, at its start).
_BIG_NUMBER = re.compile(rb"[eE][+]?0*[1-9][0-9]{2,}|(?<![0-9])[0-9]{300}")
INLINE_BODY_BYTES = 4096  # bodies up to this size are parsed and validated on the event loop (well under 1 ms)


class _NotANumber(ValueError):
    def __init__(self, token: str):
        super().__init__(token)
        self.token = token


def _refuse(token: str) -> Any:
    raise _NotANumber(token)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotANumber(text if len(text) <= 40 else text[:37] + "...")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 308:  # beyond any float: the Task or the schema could not use it as a number
        raise _NotANumber(text[:37] + "...")
    return int(text)


def strict_json(body: bytes) -> Any:
    """``json.loads`` refusing NaN, Infinity and numbers beyond float64 (a 422 naming the token). Literals that
    might overflow are rare, so only bodies that hold one are parsed with the slower per-number checks. Linear in
    the body's size (at most ``max_body_bytes``)."""
    try:
        if _BIG_NUMBER.search(body):
            return json.loads(body, parse_constant=_refuse, parse_float=_finite_float, parse_int=_bounded_int)
        return json.loads(body, parse_constant=_refuse)
    except _NotANumber as exc:
        raise HTTPException(
            422,
            f"body: {exc.token} is not a JSON number this API takes: JSON has no NaN or Infinity, and numbers must "
            "be finite (within about ±1.8e308); send finite numbers",
        ) from None
    except RecursionError:
        raise HTTPException(422, "body: JSON nested too deeply") from None


class InvalidBody(HTTPException):
    """A body that fails its request model, found off the event loop: answered as FastAPI's 422 (``errors``)."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(422)
        self.errors = errors


def _parse_and_validate(body: bytes, model: type[BaseModel] | None) -> Any:
    """The body parsed by :func:`strict_json` and, given the route's request model, validated into it strictly
    (no coercion: ``"5"``, ``5.0`` or ``true`` are no ``top_k``); FastAPI then takes the instance as it is."""
    data = strict_json(body)
    if model is None:
        return data
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise InvalidBody([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None


class _StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`_parse_and_validate`, in a worker thread for a body over
    ``INLINE_BODY_BYTES`` so that parsing and validating a large body never holds up the event loop."""

    model: type[BaseModel] | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= INLINE_BODY_BYTES:
                self._json = _parse_and_validate(body, self.model)
            else:
                self._json = await run_in_threadpool(_parse_and_validate, body, self.model)
        return self._json


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    """The request model of a route whose body is that one model (not embedded), else None."""
    params = route.dependant.body_params
    if len(params) != 1 or getattr(route, "_embed_body_fields", False):
        return None
    model = params[0].field_info.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by :func:`strict_json` and validated strictly, off the event loop when
    large."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)

        async def strict(request: Request) -> Response:
            strict_request = _StrictJSONRequest(request.scope, request.receive, request._send)
            strict_request.model = model
            return await handler(strict_request)

        return strict


def _json_safe(value: Any) -> Any:
    """A validation error's echo made JSON-safe: NaN/Inf as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _finite(response: Any, what: str) -> None:
    """Refuse an answer whose scores are NaN, Inf or beyond float32 (``what``: the refusal to raise)."""
    where = non_finite(response)
    if where is None:
        return
    if what == "query":
        raise QueryError(
            f"{where}: the scores of this request are not finite float32 numbers; its query gradients (or vectors) "
            "are too large, or the index is damaged (check with `gradstore verify --config ...`)"
        )
    raise StoreCorruptError(
        f"{where}: the index holds values whose scores are not finite; run `gradstore verify --config ...` and "
        "rebuild the index with `gradstore index --config ...`"
    )


Engine = Annotated[QueryEngine, Depends(_engine)]
Settings = Annotated[ServerConfig, Depends(_settings)]


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the 4xx/5xx answers a route gives (all carry ``{"detail": ...}``)."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in described.items()}


api = APIRouter(
    prefix="/v1",
    route_class=StrictJSONRoute,
    dependencies=[Depends(_check_api_key)],
    responses=_errors(
        {
            400: "the body could not be read (e.g. not UTF-8), its framing is ambiguous, or the API key was sent twice",
            408: "the body was not complete in time",
            401: "missing or wrong API key (when the server has one)",
            413: "request body larger than the server's limit",
            431: "request line and headers larger than the server's limit",
            422: "invalid request: the message names the field or says what is wrong",
            503: "the query engine is still loading, or the run cannot be served (the message says what to run)",
        }
    ),
)


def _limit(settings: ServerConfig, top_k: int, n_queries: int | None = None) -> None:
    """This server's limits (settings, not schema): refusals are QueryErrors, a 422 like the engine's."""
    if top_k > settings.max_top_k:
        raise QueryError(f"top_k={top_k} is above this server's limit of {settings.max_top_k}")
    if n_queries is not None and n_queries > settings.max_queries:
        raise QueryError(f"{n_queries} queries in one request; this server's limit is {settings.max_queries}")


# Engine work runs in a worker thread; its typed errors become answers in create_app's exception handler.


@api.post("/influence", response_model=InfluenceResponse, summary="Top proponents and opponents of query examples")
async def influence(body: InfluenceRequest, engine: Engine, settings: Settings, request: Request) -> InfluenceResponse:
    _limit(settings, body.top_k, body.size)
    batcher: InfluenceBatcher | None = request.app.state.batcher
    if batcher is None:
        response: InfluenceResponse = await run_in_threadpool(engine.answer_influence, body)
    else:
        response = await batcher.answer(engine, body)
    _finite(response, "query")
    metrics: Metrics = request.app.state.metrics
    timings = response.timings_ms or {}
    metrics.gradient.observe(timings["gradient"] / 1e3)
    metrics.search.observe(timings["search"] / 1e3)
    return response


@api.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Which tokens of one training example carry its score for a query (shares sum to the score)",
    responses=_errors({404: "no training example with that id"}),
)
async def explain(body: ExplainRequest, engine: Engine) -> ExplainResponse:
    response: ExplainResponse = await run_in_threadpool(engine.answer_explain, body)
    _finite(response, "query")
    return response


@api.post(
    "/self-influence", response_model=SelfInfluenceResponse, summary="Training examples with the largest self-influence"
)
async def self_influence(body: SelfInfluenceRequest, engine: Engine, settings: Settings) -> SelfInfluenceResponse:
    _limit(settings, body.top_k)
    response: SelfInfluenceResponse = await run_in_threadpool(engine.answer_self_influence, body)
    _finite(response, "index")
    return response


@api.get(
    "/examples/{example_id}",
    response_model=ExampleResponse,
    summary="The Task's description of a training example",
    responses=_errors({404: "no training example with that id"}),
)
async def example(example_id: int, engine: Engine) -> ExampleResponse:
    return ExampleResponse(id=example_id, example=await run_in_threadpool(engine.describe, example_id))


@api.get(
    "/run",
    response_model=RunInfo,
    response_model_exclude_none=True,
    summary="Run metadata: store, checkpoints, projection, index, N, D (as `gradstore info --json`)",
)
async def run(engine: Engine) -> RunInfo:
    return await run_in_threadpool(engine.run_info)


ops = APIRouter()


@ops.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get(
    "/readyz",
    summary="Readiness: the engine is loaded and the run's files can be served",
    responses={503: {"description": "still loading, shutting down, or the run cannot be served (`reason` says why)"}},
)
async def readyz(request: Request) -> JSONResponse:
    unavailable: Unavailable | None = request.app.state.unavailable
    if unavailable is not None:
        return JSONResponse({"status": "unavailable", "reason": _reason(request, unavailable)}, status_code=503)
    engine = request.app.state.engine
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    shards = getattr(getattr(engine, "index", None), "backend", None)
    readiness = getattr(shards, "readiness", None)  # an index searched elsewhere (Ray Serve): ask every shard
    gradients = getattr(getattr(engine, "gradient_service", None), "status", None)  # and the gradient replica
    if readiness is None and gradients is None:
        return JSONResponse({"status": "ready"})
    states = await run_in_threadpool(readiness) if readiness is not None else []
    extra = {"gradients": await run_in_threadpool(gradients, 5.0)} if gradients is not None else {}
    down = [s for s in [*states, *extra.values()] if s["status"] != "ready"]
    if down:
        reason = "; ".join(s["reason"] for s in down)
        expected = request.app.state.api_key
        if expected is not None and key_refusal(request.headers.raw, expected) is not None:
            names = [f"index shard {s['shard']}" if "shard" in s else "the gradient replica" for s in down]
            reason = f"{', '.join(names)} unavailable; send the API key to see why"
            states = [{k: v for k, v in s.items() if k != "reason"} for s in states]
            extra = {k: {n: v for n, v in s.items() if n != "reason"} for k, s in extra.items()}
        return JSONResponse({"status": "unavailable", "reason": reason, "shards": states, **extra}, status_code=503)
    return JSONResponse({"status": "ready", "shards": states, **extra})


def _reason(request: Request, unavailable: Unavailable) -> str:
    """Why the run cannot be served: in full (it names files) only for a client with the API key, if there is one."""
    expected = request.app.state.api_key
    if expected is None or key_refusal(request.headers.raw, expected) is None:
        return unavailable.message
    return "the run cannot be served; send the API key to see why (or read the server's log)"


@ops.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@ops.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(resources.files("gradstore.server.http").joinpath("static/dashboard.html").read_text())


def create_app(
    config: RunConfig | None = None,
    engine: QueryEngine | None = None,
    settings: ServerConfig | None = None,
    fingerprint: tuple | None = None,
) -> FastAPI:
    """The app for a run config (engine loaded at startup unless given) or an already built engine (tests,
    embedding). With a config, the run's files are watched every ``settings.watch_s`` (see ``watch.py``), starting
    from ``fingerprint`` (``watch.run_fingerprint`` taken before ``engine`` was loaded; default: now)."""
    if config is None and engine is None:
        raise ConfigError("create_app needs a run config or an engine")
    settings = settings or (config.server if config is not None else ServerConfig())
    if config is not None and settings.watch_s > 0 and fingerprint is None:
        fingerprint = run_fingerprint(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config is not None:
            Run(config).serving_threads()  # this process serves queries: no OpenMP team per small op on CPU
        if app.state.engine is None:
            assert config is not None  # create_app was given a config or an engine
            app.state.engine = await run_in_threadpool(Run(config).open_serving_engine)
        watch = None
        if config is not None and settings.watch_s > 0:
            app.state.watcher = Watcher(app, config, settings.watch_s, fingerprint)
            watch = asyncio.create_task(app.state.watcher.run())
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    app = FastAPI(
        title="gradstore",
        summary="Training-data attribution: which training examples made the model say this?",
        version=__version__,
        lifespan=lifespan,
    )
    install_docs(app)  # /docs and /redoc from the package's files, not a CDN (works offline)
    app.state.engine = engine
    app.state.unavailable = None  # an Unavailable when the run's files changed into something not servable
    app.state.watcher = None
    app.state.lifecycle = Lifecycle()  # draining is set by serving.GradstoreServer on SIGTERM
    app.state.settings = settings
    window = settings.batch_window_ms / 1e3
    batcher = InfluenceBatcher(window, settings.max_queries, settings.batch_merge) if window > 0 else None
    app.state.batcher = batcher  # None: each influence request alone
    app.state.api_key = settings.api_key  # None or a non-empty key (ServerConfig refuses an empty one)
    app.state.metrics = Metrics()
    # inside CORS: refusals still carry its headers. The gate decides from headers alone (key, route, length);
    # only a request it lets through has its body read (BodyLimit), then parsed off the event loop.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(
        RequestGate, max_header_bytes=settings.max_header_bytes, max_bytes=settings.max_body_bytes, protected="/v1/"
    )
    app.add_middleware(Drain, lifecycle=app.state.lifecycle)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )

    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # outermost: counts 413s and CORS answers too

    @app.exception_handler(GradstoreError)
    async def gradstore_error(request: Request, exc: GradstoreError) -> JSONResponse:
        """Every gradstore error as ``{"detail": message}`` with its status from errors.HTTP_STATUS."""
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 with the echoed input made JSON-safe (a NaN or Inf input would make it a 500)."""
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(InvalidBody)
    async def invalid_body(request: Request, exc: InvalidBody) -> JSONResponse:
        """A body refused by its model off the event loop: the same 422 as FastAPI's own."""
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors))}, status_code=422)

    app.include_router(api)
    app.include_router(ops)
    return app
