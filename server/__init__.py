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
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradstore")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"

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
