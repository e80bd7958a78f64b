"""Query engine, HTTP API, Python SDK and CLI over a run's gradient store and index.

Modules:
    schemas     request and response models: the one definition of query options, defaults and rules
    engine      ``QueryEngine``: query gradients, checkpoint weights, search, result assembly (no FastAPI)
    config      ``RunConfig``: the typed ``run.toml`` (``ServerConfig`` reads ``GRADSTORE_*`` variables)
    runs        what a run config drives: ``index_run``, ``open_index``, ``open_engine``, ``describe_run``
    errors      ``QueryError``, ``ConfigError``, ``GradstoreAPIError`` and the error -> HTTP status table
    client      ``Client`` / ``AsyncClient``: the SDK, on httpx
    app         ``create_app``: the FastAPI service (import it explicitly; this package does not load FastAPI)
    middleware  ASGI body limit and Prometheus request metrics of the app
    cli         the ``gradstore`` command
    demo        the embedded digits demo (``gradstore demo``)
    docs        ``/docs`` and ``/redoc`` from the package's own Swagger UI / ReDoc files (no CDN)

Importing this package loads nothing heavy: the names below are imported on first use (PEP 562), so
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
    from .config import RunConfig, ServerConfig
    from .engine import QueryEngine
    from .errors import ConfigError, GradstoreAPIError, InvalidRequestError, QueryError
    from .runs import describe_run, index_run, open_engine, open_index
    from .schemas import (
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
    "config": ("RunConfig", "ServerConfig"),
    "engine": ("QueryEngine",),
    "errors": ("ConfigError", "GradstoreAPIError", "InvalidRequestError", "QueryError"),
    "runs": ("describe_run", "index_run", "open_engine", "open_index"),
    "schemas": (
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
