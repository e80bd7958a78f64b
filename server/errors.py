"""The server package's errors, the one table that maps gradstore errors to HTTP statuses, and the wording of
pydantic validation errors for each audience.

    GradstoreError (gradstore.projection)
    ├── QueryError .............. ValueError    a query the engine cannot answer as asked (bad payload or option)
    ├── ConfigError ............. ValueError    a run config (``run.toml``) or engine setting that is missing or invalid
    ├── EvaluationError ......... ValueError    an evaluation that cannot run as asked (no Task.train, a bad file)
    └── GradstoreAPIError ....... RuntimeError  the HTTP server refused a request (``.status_code``, ``.message``)
        └── InvalidRequestError . ValueError    the SDK refused it before sending: the request model says why (422)

HTTP statuses (:data:`HTTP_STATUS`, looked up along the error's MRO): a mistake in the request is a 4xx
(422 for a query or option the engine refuses, 404 for an example id it does not have); a problem with the
server's run (its store, index or config) is a 503 whose message says how to fix it (usually: re-index); any
other error is a 500 carrying its message.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from gradstore.projection import GradstoreError  # the errors alone: no torch (the HTTP client imports this module)

__all__ = [
    "HTTP_STATUS",
    "ConfigError",
    "EvaluationError",
    "GradstoreAPIError",
    "InvalidRequestError",
    "QueryError",
    "api_field_errors",
    "config_field_errors",
    "http_status",
    "query_error",
]


class QueryError(GradstoreError, ValueError):
    """A query the engine cannot answer as asked (bad payload, bad option); the message says why."""


class ConfigError(GradstoreError, ValueError):
    """The run config is missing or malformed, or names something that does not exist; the message names the
    field as ``section.field`` (``checkpoints[1].lr``)."""


class EvaluationError(GradstoreError, ValueError):
    """An evaluation (``gradstore evaluate``) that cannot run as asked: the Task lacks the optional method it needs
    (``train``, ``correct``), or a queries, labels or retrain-results file is malformed; the message says what to do."""


class GradstoreAPIError(GradstoreError, RuntimeError):
    """The server refused a request; ``status_code`` and the server's ``message`` say why."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message = status_code, message


class InvalidRequestError(GradstoreAPIError, ValueError):
    """The SDK refused a request before sending it: the request model (the one the server validates with)
    rejects it. It carries the answer the server would give, status 422 and ``body.<field>: <why>`` messages,
    so one ``except GradstoreAPIError`` handles both; ``errors`` is pydantic's list."""

    def __init__(self, error: ValidationError):
        super().__init__(422, api_field_errors(error))
        self.errors = error.errors(include_url=False)


class _StatusTable(Mapping[type[BaseException], int]):
    """:data:`HTTP_STATUS`, filled on first use: most of its classes live in ``gradstore.store`` and
    ``gradstore.logger`` (torch, Zarr, FAISS), which the HTTP client, importing this module, must not load."""

    @functools.cached_property
    def _table(self) -> dict[type[BaseException], int]:
        from gradstore.logger import NonFiniteGradientError
        from gradstore.logger.errors import HFTaskError
        from gradstore.store import (
            CheckpointMismatchError,
            CheckpointNotFoundError,
            IndexMismatchError,
            IndexNotFoundError,
            QueryShapeError,
            RemoteStoreError,
            StaleIndexError,
            StoreFormatError,
            StoreNotFoundError,
            UnknownExampleError,
        )

        return {
            # the request's mistake
            QueryError: 422,
            QueryShapeError: 422,  # precomputed vectors that do not fit the index
            CheckpointNotFoundError: 422,  # a checkpoint the index does not have
            NonFiniteGradientError: 422,  # a query example whose gradient is NaN/Inf
            UnknownExampleError: 404,
            # the server's run: unusable until someone rebuilds or fixes it (the message says how)
            StaleIndexError: 503,
            IndexMismatchError: 503,
            IndexNotFoundError: 503,
            StoreNotFoundError: 503,
            StoreFormatError: 503,
            CheckpointMismatchError: 503,
            ConfigError: 503,
            HFTaskError: 503,  # the run's model / checkpoint folder or data set
            RemoteStoreError: 503,  # a store or index URL it cannot reach or read
        }

    def __getitem__(self, key: type[BaseException]) -> int:
        return self._table[key]

    def __iter__(self) -> Iterator[type[BaseException]]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


HTTP_STATUS: Mapping[type[BaseException], int] = _StatusTable()


def http_status(error: BaseException) -> int:
    """The HTTP status of an error: the first of its classes in :data:`HTTP_STATUS`, else 500."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


# -- validation errors, worded for who reads them -------------------------------------------------------------


def _why(error: Mapping[str, Any]) -> str:
    """A validator's own message as raised (pydantic prefixes ``Value error, ``), else pydantic's message."""
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    return str(error["msg"])


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("checkpoints", 1, "lr")`` -> ``checkpoints[1].lr``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_OWN_WORDS = {"value_error", "assertion_error", "missing", "index_options"}  # messages that say what was given


def config_field_errors(
    error: ValidationError, known: Mapping[tuple[int | str, ...], list[str]] | None = None
) -> list[str]:
    """One ``section.field: why`` line per error of a run config; ``known`` maps a table's location to its keys
    (named when a key is unknown). Scalars that were given are quoted, since they may come from the environment."""
    lines = []
    for e in error.errors(include_url=False):
        loc, why = tuple(e["loc"]), _why(e)
        if e["type"] == "extra_forbidden":
            keys = (known or {}).get(loc[:-1])
            why = "unknown key" + (f"; this table takes {', '.join(keys)}" if keys else "")
        elif e["type"] not in _OWN_WORDS and isinstance(e.get("input"), (str, int, float, bool)):
            why += f", got {e['input']!r}"
        lines.append(f"{_dotted(loc) or 'run config'}: {why}")
    return lines


def api_field_errors(error: ValidationError) -> str:
    """The errors as the server words a 422 for a bad body: ``body.<field>: <msg>``, joined by ``; ``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in ('body', *e['loc']))}: {e['msg']}" for e in error.errors(include_url=False)
    )


def query_error(error: ValidationError) -> QueryError:
    """The request model's refusal as a :class:`QueryError` for in-process callers (engine, CLI): one sentence
    per problem, e.g. ``top_k must be at least 1, got 0``."""
    sentences = []
    for e in error.errors(include_url=False):
        field, ctx = _dotted(tuple(e["loc"])), e.get("ctx", {})
        if e["type"] == "greater_than_equal" and field:
            sentences.append(f"{field} must be at least {ctx['ge']}, got {e['input']!r}")
        elif e["type"] == "literal_error" and field:
            sentences.append(f"{field} must be {ctx['expected']}, got {e['input']!r}")
        else:
            sentences.append(f"{field}: {_why(e)}" if field else _why(e))
    return QueryError("; ".join(sentences))
