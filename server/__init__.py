"""The run layer and what serves it: the query engine, the HTTP API, the Python SDK and the CLI.

Packages and modules:
    run/        the run layer, no FastAPI: ``Run`` (a run's paths, the eval-store rule, opening its index and
                engine), ``RunConfig`` (``run.toml``), the offline ``index`` job, ``QueryEngine`` and the request and
                response schemas
    http/       the HTTP service on FastAPI: ``create_app`` (``http.app``), request gate and metrics middleware,
                uvicorn serving, live reload (``http.watch``), micro-batching, offline ``/docs``, the dashboard
    client      ``Client`` / ``AsyncClient``: the SDK, on httpx and pydantic only (no torch, FAISS or Zarr)
    cli         the ``gradstore`` command
    errors      ``QueryError``, ``ConfigError``, ``GradstoreAPIError`` and the error -> HTTP status table

Evaluation (``gradstore.evaluation``) and the demos (``gradstore.demos``) are packages of their own, on top of this
one. Importing this package loads nothing heavy: the names below are imported on first use (PEP 562), so
``gradstore.server.client`` and ``gradstore --help`` do not pay for torch, FAISS or Zarr.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("gradstore")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from .client import AsyncClient, Client
    from .errors import ConfigError, GradstoreAPIError, InvalidRequestError, QueryError
    from .run.config import RunConfig, ServerConfig
    from .run.engine import QueryEngine
    from .run.run import Run, describe_run, index_run, open_engine, open_index
    from .run.schemas import (
        ExampleResponse,
        ExplainRequest,
        ExplainResponse,
        Influence,
        InfluenceOptions,
        InfluenceRequest,
        InfluenceResponse,
        QueryResult,
        RunInfo,
        ScoringOptions,
        SelfInfluenceRequest,
        SelfInfluenceResponse,
        TokenShare,
    )

_LAZY = {
    "client": ("AsyncClient", "Client"),
    "run.config": ("RunConfig", "ServerConfig"),
    "run.engine": ("QueryEngine",),
    "errors": ("ConfigError", "GradstoreAPIError", "InvalidRequestError", "QueryError"),
    "run.run": ("Run", "describe_run", "index_run", "open_engine", "open_index"),
    "run.schemas": (
        "ExampleResponse",
        "ExplainRequest",
        "ExplainResponse",
        "Influence",
        "InfluenceOptions",
        "InfluenceRequest",
        "InfluenceResponse",
        "QueryResult",
        "RunInfo",
        "ScoringOptions",
        "SelfInfluenceRequest",
        "SelfInfluenceResponse",
        "TokenShare",
    ),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "ExampleResponse",
    "ExplainRequest",
    "ExplainResponse",
    "GradstoreAPIError",
    "Influence",
    "InfluenceOptions",
    "InfluenceRequest",
    "InfluenceResponse",
    "InvalidRequestError",
    "QueryEngine",
    "QueryError",
    "QueryResult",
    "Run",
    "RunConfig",
    "RunInfo",
    "ScoringOptions",
    "SelfInfluenceRequest",
    "SelfInfluenceResponse",
    "ServerConfig",
    "TokenShare",
    "__version__",
    "describe_run",
    "index_run",
    "open_engine",
    "open_index",
]
