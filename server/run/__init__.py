"""The run layer: a run's config, the offline indexing job, the query engine and the schemas it answers with.

Modules:
    run         ``Run``: a run's paths (store, eval store, index), the eval-store rule, opening its index and engine
    config      ``RunConfig``: the typed ``run.toml`` (``ServerConfig`` reads ``GRADSTORE_*`` variables)
    index_job   the offline ``gradstore index`` job (log what the store lacks, build or update the index)
    checks      what ``gradstore verify`` checks of the config and weights files against the store
    engine      ``QueryEngine``: query gradients at each checkpoint, search, result assembly
    schemas     request and response models: the one definition of query options, defaults and rules
    weights     ``WeightsFile``: a checkpoint's weights file, checked against its recorded sha256 on load

Nothing here imports FastAPI. Importing this package loads nothing heavy (the SDK reads ``run.schemas``): ``Run``
and the shortcuts are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Run, describe_run, index_run, open_engine, open_index

_LAZY = ("Run", "describe_run", "index_run", "open_engine", "open_index")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(".run", __name__), name)
    globals()[name] = value
    return value


__all__ = ["Run", "describe_run", "index_run", "open_engine", "open_index"]
