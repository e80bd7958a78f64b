"""Attribution scores of every training example for each query: from the run's configured index and from
re-indexes of the same store with other preconditioners (built aside, ``flat``, never replacing the configured
index). A preconditioner is a re-index, not a re-log: the store keeps the raw projected vectors."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from gradstore.projection import PRECONDITIONERS, GradstoreError, PreconditionerKind
from gradstore.server.errors import EvaluationError
from gradstore.store import GradientIndex, GradientStore, IndexOptions

SCORE_BLOCK_ROWS = 16384  # index rows scored per step (bounds the memory of a pass over a big index)


@dataclass
class Method:
    """One way of scoring: an index (the configured one, or a re-index with another preconditioner).

    ``index`` is None when the preconditioner could not be built for this store; ``error`` then says why."""

    name: str
    options: IndexOptions
    configured: bool
    path: Path
    index: GradientIndex | None
    build_s: float = 0.0
    error: str | None = None
    lr_weighting: str | None = None  # the checkpoint weighting it was scored with (set when scoring)

    def describe(self) -> dict:
        """The JSON description of the method, as ``evaluation.json`` lists it."""
        o = self.options
        return {
            "name": self.name,
            "preconditioner": o.preconditioner,
            "normalize": o.normalize,
            "kind": o.kind,
            "configured": self.configured,
            "index": str(self.path),
            "build_s": round(self.build_s, 4),
            "lr_weighting": self.lr_weighting,
            "error": self.error,
        }


def parse_preconditioners(value: str | Sequence[str] | None) -> list[str]:
    """``"identity,kfac"`` (or a list) -> names, each checked against ``PRECONDITIONERS``; ``all``: every one."""
    if value is None:
        return []
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(PRECONDITIONERS)
    unknown = [n for n in names if n not in PRECONDITIONERS]
    if unknown:
        raise EvaluationError(f"unknown preconditioners {unknown}; choose from {list(PRECONDITIONERS)} or 'all'")
    return list(dict.fromkeys(names))


def aside_method(
    store: GradientStore,
    options: IndexOptions,
    path: Path,
    checkpoints: Sequence[str],
    eval_store: GradientStore | None = None,
    progress: bool = False,
    name: str | None = None,
) -> Method:
    """The index of ``store`` with ``options`` at ``path``: reused when one there matches the store, the options and
    the checkpoints, else (re)built. A preconditioner this store cannot support is recorded in ``error``."""
    name = name or options.preconditioner
    try:
        index = GradientIndex.open(path, store, options=options, eval_store=eval_store, device="cpu")
        if list(index.checkpoints) == list(checkpoints):
            return Method(name, options, False, path, index)
    except GradstoreError:
        pass  # missing, stale or built otherwise: build it
    start = time.perf_counter()
    try:
        index = GradientIndex.build(
            store, options, path=path, checkpoints=list(checkpoints), eval_store=eval_store, progress=progress
        )
    except GradstoreError as exc:
        return Method(name, options, False, path, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return Method(name, options, False, path, index, time.perf_counter() - start)


def index_rows(index: GradientIndex, ids: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` in the index (whose ids are sorted); every id must be indexed."""
    rows = np.searchsorted(index.ids, ids)
    found = (rows < len(index.ids)) & (index.ids[np.minimum(rows, len(index.ids) - 1)] == ids)
    if not found.all():
        missing = ids[~found][:10].tolist()
        raise EvaluationError(
            f"{int((~found).sum())} training examples are not in index {index.path} (e.g. ids {missing}); "
            "finish logging (`gradstore index` resumes) so that every training example is scored"
        )
    return rows


def score_matrix(index: GradientIndex, raw: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[Q, N]`` float64 scores of the training examples ``ids`` for raw query gradients ``raw`` ``[Q, C, D]``:
    ``sum_c w_c <T_c q_c, T_c g_i,c>``, exactly what :meth:`GradientIndex.search` re-scores its candidates with."""
    queries = index.prepare(raw, weights)
    rows = index_rows(index, np.asarray(ids, dtype=np.int64))
    out = np.empty((queries.num_queries, len(rows)))
    for lo in range(0, len(rows), SCORE_BLOCK_ROWS):
        block = rows[lo : lo + SCORE_BLOCK_ROWS]
        out[:, lo : lo + len(block)] = index.score_rows(queries, block).sum(-1)
    return out


def replaced(options: IndexOptions, preconditioner: str) -> IndexOptions:
    """The configured options with another preconditioner, as an exact ``flat`` index (the comparison must not
    depend on an approximate search)."""
    return dataclasses.replace(options, preconditioner=cast(PreconditionerKind, preconditioner), kind="flat")
