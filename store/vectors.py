"""Stored rows -> index vectors: the examples every checkpoint holds, per-checkpoint preconditioners, and the
transformed (optionally unit-norm) vectors ``[T_1 g_1, ..., T_C g_C]`` streamed in blocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from gradstore.projection import CurvatureStats, Preconditioner, normalize_rows

from .errors import StoreFormatError
from .gradient_store import GradientStore
from .index_options import IndexOptions
from .rows import CheckpointRows


class IndexVectors(NamedTuple):
    """Index vectors of some examples and the per-checkpoint squared norms self-influence needs."""

    vectors: np.ndarray  # [n, C*D] float32
    sqnorms: np.ndarray  # [n, C] float64


class VectorBlock(NamedTuple):
    """One streamed block: the vectors of ``ids[start : start + len(vectors)]``."""

    start: int
    vectors: np.ndarray  # [n, C*D] float32
    sqnorms: np.ndarray  # [n, C] float64


class IndexedIds(NamedTuple):
    """The example ids an index holds (sorted): every id with a row at some checkpoint. ``missing`` says, per
    checkpoint, how many of them have no row there and why: ``skipped`` (a GradScaler skipped the step that held
    them, so they changed nothing at that checkpoint) or ``absent`` (not logged, e.g. an unfinished pass)."""

    ids: np.ndarray
    missing: dict[str, dict[str, int]]


def indexed_ids(rows: dict[str, CheckpointRows]) -> IndexedIds:
    """The union of the checkpoints' ids; an example without a row at a checkpoint contributes zero there."""
    union = np.unique(np.concatenate([r.sorted_ids for r in rows.values()]))
    if len(union) == 0:
        raise StoreFormatError(
            f"no example has committed rows at any of the checkpoints {list(rows)}; nothing to index"
        )
    missing = {}
    for name, r in rows.items():
        lacking = np.setdiff1d(union, r.sorted_ids, assume_unique=True)
        if len(lacking):
            skipped = int(np.isin(lacking, r.store.skipped_ids(name)).sum())
            missing[name] = {"skipped": skipped, "absent": len(lacking) - skipped}
    return IndexedIds(union, missing)


class VectorSource:
    """Reads aligned rows of every checkpoint and turns them into index vectors."""

    def __init__(
        self, rows: dict[str, CheckpointRows], preconditioners: dict[str, Preconditioner], normalize: bool, dim: int
    ):
        self.rows, self.preconditioners, self.normalize, self.dim = rows, preconditioners, normalize, dim

    @property
    def num_checkpoints(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Length ``C * D`` of an index vector."""
        return len(self.rows) * self.dim

    def vectors(self, ids: np.ndarray) -> IndexVectors:
        """Index vectors of the given example ids, in their order."""
        parts, sqnorms = [], []
        for name, rows in self.rows.items():
            v = self.preconditioners[name].apply(rows.read_or_zero(ids))
            # self-influence is the squared norm before unit normalisation (after it, every norm would be 1)
            sqnorms.append(np.einsum("nd,nd->n", v.astype(np.float64), v.astype(np.float64)))
            parts.append(normalize_rows(v) if self.normalize else v)
        return IndexVectors(np.concatenate(parts, axis=1), np.stack(sqnorms, axis=1))

    def blocks(self, ids: np.ndarray, block_rows: int, desc: str, progress: bool) -> Iterator[VectorBlock]:
        """:meth:`vectors` of ``ids`` in blocks of ``block_rows``, with a progress bar labelled ``desc``."""
        with tqdm(total=len(ids), desc=desc, unit="row", disable=not progress) as bar:
            for start in range(0, len(ids), block_rows):
                block = self.vectors(ids[start : start + block_rows])
                yield VectorBlock(start, block.vectors, block.sqnorms)
                bar.update(len(block.vectors))


def fit_preconditioner(
    store: GradientStore, eval_store: GradientStore | None, checkpoint: str, options: IndexOptions, progress: bool
) -> Preconditioner:
    """Checkpoint ``checkpoint``'s preconditioner, from one streaming pass over its rows (and the eval store's)."""
    if options.preconditioner == "identity":
        return Preconditioner.identity(store.spec.layers)

    def stats(source: GradientStore, label: str) -> CurvatureStats:
        acc = CurvatureStats(options.preconditioner, store.spec.layers)
        total = source.num_rows(checkpoint)
        desc = f"{options.preconditioner} {label} {checkpoint}"
        with tqdm(total=total, desc=desc, unit="row", disable=not progress) as bar:
            for _, block in source.iter_blocks(checkpoint, block_rows=options.block_rows):
                acc.update(block)
                bar.update(len(block))
        return acc

    eval_stats = stats(eval_store, "eval") if eval_store is not None else None
    return Preconditioner.fit(stats(store, "train"), eval_stats, mix=options.mix, damping=options.damping)
