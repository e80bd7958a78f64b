"""Stored rows -> index vectors: the examples every checkpoint holds, per-checkpoint preconditioners, and the
transformed (optionally unit-norm) vectors ``[T_1 g_1, ..., T_C g_C]`` streamed in blocks.

Self-influence is the diagonal of the index's bilinear form, before unit normalisation: ``||T_c g_c||^2`` for the
symmetric preconditioners, ``<g_L, T_c g_c>`` for ``source`` (whose query is the final checkpoint's gradient)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from gradstore.projection import (
    CurvatureStats,
    EigenvalueStats,
    EkfacCurvature,
    Preconditioner,
    PreconditionerError,
    kind_traits,
    kronecker_eigenbases,
    mixed_means,
    training_intervals,
)

from .errors import StoreFormatError
from .gradient_store import GradientStore
from .index_options import IndexOptions
from .rows import CheckpointRows
from .scoring import Scoring


class IndexVectors(NamedTuple):
    """Index vectors of some examples and the per-checkpoint squared norms self-influence needs."""

    vectors: np.ndarray  # [n, C*D] float32
    sqnorms: np.ndarray  # [n, C] float64: self-influence terms (||T_c g_c||^2, or <g_L, T_c g_c> for source)


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
        self.scoring = Scoring(list(rows), preconditioners, normalize)
        # source: the query is the final checkpoint's gradient, so self-influence pairs g_L with each T_c g_c
        self.final_query = self.scoring.final_query

    @property
    def num_checkpoints(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Length ``C * D`` of an index vector."""
        return len(self.rows) * self.dim

    def vectors(self, ids: np.ndarray) -> IndexVectors:
        """Index vectors of the given example ids, in their order (the transform is :class:`Scoring`'s)."""
        final = list(self.rows)[-1]
        raw_final = self.rows[final].read_or_zero(ids) if self.final_query else None
        raw = {
            name: raw_final if name == final and raw_final is not None else rows.read_or_zero(ids)
            for name, rows in self.rows.items()
        }
        return IndexVectors(*self.scoring.index_vectors(raw, raw_final))

    def blocks(self, ids: np.ndarray, block_rows: int, desc: str, progress: bool) -> Iterator[VectorBlock]:
        """:meth:`vectors` of ``ids`` in blocks of ``block_rows``, with a progress bar labelled ``desc``."""
        with tqdm(total=len(ids), desc=desc, unit="row", disable=not progress) as bar:
            for start in range(0, len(ids), block_rows):
                block = self.vectors(ids[start : start + block_rows])
                yield VectorBlock(start, block.vectors, block.sqnorms)
                bar.update(len(block.vectors))


def _stream(source: GradientStore, checkpoint: str, options: IndexOptions, desc: str, progress: bool):
    total = source.num_rows(checkpoint)
    with tqdm(total=total, desc=desc, unit="row", disable=not progress) as bar:
        for _, block in source.iter_blocks(checkpoint, block_rows=options.block_rows):
            yield block
            bar.update(len(block))


def fit_preconditioner(
    store: GradientStore, eval_store: GradientStore | None, checkpoint: str, options: IndexOptions, progress: bool
) -> Preconditioner:
    """Checkpoint ``checkpoint``'s preconditioner, from one streaming pass over its rows (and the eval store's);
    ``ekfac`` takes two. ``source`` couples the checkpoints: use :func:`fit_preconditioners`."""
    kind = options.preconditioner
    if kind == "identity":
        return Preconditioner.identity(store.spec.layers)
    if kind == "source":
        raise PreconditionerError("a source preconditioner couples every checkpoint; fit it with fit_preconditioners")
    eval_store = eval_store if kind_traits(kind).eval_mix else None
    if kind == "ekfac":
        return Preconditioner.ekfac(
            fit_ekfac_curvature(store, eval_store, checkpoint, options, progress), options.damping
        )

    def stats(source: GradientStore, label: str) -> CurvatureStats:
        acc = CurvatureStats(kind, store.spec.layers)
        for block in _stream(source, checkpoint, options, f"{kind} {label} {checkpoint}", progress):
            acc.update(block)
        return acc

    eval_stats = stats(eval_store, "eval") if eval_store is not None else None
    return Preconditioner.fit(stats(store, "train"), eval_stats, mix=options.mix, damping=options.damping)


def fit_ekfac_curvature(
    store: GradientStore, eval_store: GradientStore | None, checkpoint: str, options: IndexOptions, progress: bool
) -> EkfacCurvature:
    """Checkpoint ``checkpoint``'s EK-FAC curvature: KFAC bases from one pass, eigenvalues in them from a second
    (both mixed with the eval store's as ``mix * eval + (1 - mix) * train`` when one is given)."""
    sources = {"train": store} if eval_store is None else {"train": store, "eval": eval_store}
    kfac = {}
    for label, source in sources.items():
        kfac[label] = CurvatureStats("kfac", store.spec.layers)
        for block in _stream(
            source, checkpoint, options, f"{options.preconditioner} bases {label} {checkpoint}", progress
        ):
            kfac[label].update(block)
    bases = kronecker_eigenbases(mixed_means(kfac["train"], kfac.get("eval"), options.mix))
    eigen = {}
    for label, source in sources.items():
        eigen[label] = EigenvalueStats(store.spec.layers, bases)
        desc = f"{options.preconditioner} eigenvalues {label} {checkpoint}"
        for block in _stream(source, checkpoint, options, desc, progress):
            eigen[label].update(block)
    return EkfacCurvature.fit(eigen["train"], eigen.get("eval"), mix=options.mix)


def fit_preconditioners(
    store: GradientStore,
    eval_store: GradientStore | None,
    checkpoints: Sequence[str],
    options: IndexOptions,
    progress: bool,
) -> dict[str, Preconditioner]:
    """Every indexed checkpoint's preconditioner (``checkpoints`` in index order; for ``source`` that is training
    order, its steps increasing, and the last one is where queries are taken)."""
    if options.preconditioner != "source":
        return {name: fit_preconditioner(store, eval_store, name, options, progress) for name in checkpoints}
    infos = [store.checkpoint_info(name) for name in checkpoints]
    schedule = training_intervals(
        list(checkpoints), [info.step for info in infos], [info.lr for info in infos]
    )  # fail early
    curvatures = [fit_ekfac_curvature(store, None, name, options, progress) for name in checkpoints]
    return dict(zip(checkpoints, Preconditioner.source(curvatures, schedule, options.damping), strict=True))
