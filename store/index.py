"""The search index beside a store: preconditioned, optionally normalised per-checkpoint vectors, concatenated.

Row ``r`` of the index is example ``ids[r]`` (ids present in every indexed checkpoint, sorted); its
vector is ``[T_1 g_r,1, ..., T_C g_r,C]`` with ``T_c`` checkpoint ``c``'s preconditioner (and unit
normalisation). Learning-rate weights live on the query side, so a weighting or a checkpoint subset is
a query option: ``score = sum_c w_c <T_c q_c, T_c g_r,c>``. For ``source`` the form is asymmetric, the query the
final checkpoint's gradient in every slot: ``score = sum_c w_c <q_L, T_c g_r,c>`` (projection/source.py).

The index kind picks a search backend (``store/search.py``): ``flat`` scans every row exactly and also yields
mean/max |score|; ``ivf``, ``hnsw`` and ``ivfpq`` are FAISS indexes whose candidates (``k * rerank`` of them)
are re-scored exactly here, from the exact vectors the backend holds or from the candidates' rows in the store.

On disk (a directory, by default ``<store stem>.index`` beside the store)::

    manifest.json      options, checkpoints, dims, store fingerprint (written last; store/manifest.py)
    ids.npy            [N] example ids of the rows
    sqnorms.npy        [N, C] squared norms of the transformed vectors (self-influence)
    preconditioner.npz per-checkpoint per-layer transforms
    vectors.npy        flat: [N, C*D] float32
    faiss.index        ivf / hnsw / ivfpq

A build writes a temporary directory and swaps it in, so a crash never leaves a half-built index.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gradstore.projection import Preconditioner, PreconditionerKind, kind_traits, normalize_rows

from .errors import QueryShapeError, StoreFormatError
from .gradient_store import GradientStore
from .index_options import BUILD_FIELDS, KINDS, IndexKind, IndexOptions
from .manifest import IndexManifest, building
from .rows import CheckpointRows
from .search import BACKENDS, SearchBackend
from .vectors import VectorSource, fit_preconditioners, indexed_ids

__all__ = [
    "BUILD_FIELDS",
    "KINDS",
    "GradientIndex",
    "IndexKind",
    "IndexOptions",
    "SearchResult",
    "default_index_path",
]

PRECONDITIONER_FILE = "preconditioner.npz"


@dataclass
class SearchResult:
    """Per query: rows and exact scores of proponents (descending) and opponents (ascending), with contributions."""

    proponent_rows: np.ndarray  # [B, k]
    proponent_scores: np.ndarray  # [B, k] float64
    proponent_contributions: np.ndarray  # [B, k, C]
    opponent_rows: np.ndarray
    opponent_scores: np.ndarray
    opponent_contributions: np.ndarray
    mean_abs_score: np.ndarray | None  # [B] (flat only: needs every score)
    max_abs_score: np.ndarray | None


class _Ranked(NamedTuple):
    """The best ``k`` candidates of each query, exactly re-scored; ``-1`` rows pad when fewer were found."""

    rows: np.ndarray  # [B, k]
    scores: np.ndarray  # [B, k] float64
    contributions: np.ndarray  # [B, k, C] float64


class _Fetched(NamedTuple):
    """The exact vectors of a sorted set of rows, fetched once for every query's candidates."""

    rows: np.ndarray  # sorted, unique
    vectors: np.ndarray  # [len(rows), C*D] float32

    def of(self, rows: np.ndarray) -> np.ndarray:
        return self.vectors[np.searchsorted(self.rows, rows)]


def default_index_path(store_path: str | Path) -> Path:
    """``<store stem>.index`` beside the store."""
    store_path = Path(store_path)
    return store_path.with_suffix(".index") if store_path.suffix else store_path.with_name(store_path.name + ".index")


def _save_preconditioners(directory: Path, preconditioners: dict[str, Preconditioner]) -> None:
    arrays = {key: array for name, p in preconditioners.items() for key, array in p.to_arrays(name).items()}
    np.savez(directory / PRECONDITIONER_FILE, **arrays)  # type: ignore[arg-type]  # the stub confuses allow_pickle


def _load_preconditioners(
    directory: Path, kind: PreconditionerKind, store: GradientStore, checkpoints: Sequence[str]
) -> dict[str, Preconditioner]:
    arrays = dict(np.load(directory / PRECONDITIONER_FILE))
    return {name: Preconditioner.from_arrays(kind, store.spec.layers, arrays, name) for name in checkpoints}


class GradientIndex:
    """A built index, loaded and checked against its store. Create with :meth:`build`, load with :meth:`open`."""

    def __init__(self, path: Path, store: GradientStore, manifest: IndexManifest, device: str | None = None):
        self.path, self.store, self.manifest = path, store, manifest
        self.options = manifest.options
        self.checkpoints: list[str] = list(manifest.checkpoints)
        self.lrs: dict[str, float] = dict(zip(self.checkpoints, manifest.lrs, strict=True))
        self.dim = store.dim
        self.ids = np.load(path / "ids.npy")
        self.sqnorms = np.load(path / "sqnorms.npy")
        self.preconditioners = _load_preconditioners(path, self.options.preconditioner, store, self.checkpoints)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backend: SearchBackend = BACKENDS[self.options.kind].load(path, self.options, self.device)
        self._store_vectors: VectorSource | None = None  # reads exact vectors a backend does not hold

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store: GradientStore,
        options: IndexOptions | None = None,
        path: str | Path | None = None,
        checkpoints: Sequence[str] | None = None,
        eval_store: GradientStore | None = None,
        progress: bool = True,
    ) -> GradientIndex:
        """Build (or replace) the index of ``store`` (default options: :class:`IndexOptions`) and return it loaded."""
        options = options if options is not None else IndexOptions()
        path = Path(path) if path is not None else default_index_path(store.path)
        checkpoints = list(checkpoints) if checkpoints is not None else store.checkpoints
        if not checkpoints:
            raise StoreFormatError(f"store {store.path} has no checkpoints to index; log some first")
        for name in checkpoints:
            store.checkpoint_info(name)  # raises CheckpointNotFoundError with the available names
        if not kind_traits(options.preconditioner).eval_mix:
            eval_store = None  # R_eval only enters curvature preconditioners (not identity, not source's dynamics)
        if eval_store is not None:
            eval_store.check_compatible(store.spec)
        # fingerprints first: rows committed while the index is built then make it stale instead of incomplete
        store_fingerprint = store.fingerprint()
        eval_fingerprint = eval_store.fingerprint() if eval_store is not None else None
        rows = {name: CheckpointRows(store, name) for name in checkpoints}
        ids, missing = indexed_ids(rows)
        absent = {name: m["absent"] for name, m in missing.items() if m["absent"]}
        if absent:
            warnings.warn(
                f"{sum(absent.values())} example rows are absent (not logged) at some checkpoints, which then count "
                "them "
                f"as zero (per checkpoint: {absent}). Finish logging (it resumes) and rebuild to include them.",
                stacklevel=2,
            )
        manifest = IndexManifest(
            options=options,
            checkpoints=checkpoints,
            lrs=[store.checkpoint_info(name).lr for name in checkpoints],
            dim=store.dim,
            num_rows=len(ids),
            store_fingerprint=store_fingerprint,
            projection_fingerprint=store.spec.fingerprint(),
            eval_store=str(eval_store.path) if eval_store is not None else None,
            eval_fingerprint=eval_fingerprint,
            missing_rows=missing,
        )
        preconditioners = fit_preconditioners(store, eval_store, checkpoints, options, progress)
        source = VectorSource(rows, preconditioners, options.normalize, store.dim)
        with building(path) as directory:
            sqnorms = BACKENDS[options.kind].build(source, ids, options, directory, progress)
            np.save(directory / "ids.npy", ids)
            np.save(directory / "sqnorms.npy", sqnorms)
            _save_preconditioners(directory, preconditioners)
            manifest.with_files(directory).write(directory)  # last: a directory with a manifest is a finished index
        return cls.open(path, store, options=options, eval_store=eval_store)

    @classmethod
    def rebuild(
        cls, path: str | Path, store: GradientStore, eval_store: GradientStore | None = None, progress: bool = True
    ) -> GradientIndex:
        """Build again with the options and checkpoints of the index at ``path`` (e.g. after the store grew)."""
        manifest = IndexManifest.read(Path(path))
        return cls.build(store, manifest.options, path, manifest.checkpoints, eval_store=eval_store, progress=progress)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path | None,
        store: GradientStore,
        options: IndexOptions | None = None,
        eval_store: GradientStore | None = None,
        device: str | None = None,
    ) -> GradientIndex:
        """Load an index, refusing one whose store changed or whose build options differ from ``options``."""
        path = Path(path) if path is not None else default_index_path(store.path)
        manifest = IndexManifest.read(path)
        if not kind_traits(manifest.options.preconditioner).eval_mix:
            eval_store = None  # built without one (source): an eval store beside the run does not change it
        manifest.check_store(path, store, eval_store)
        manifest.check_files(path)
        return cls(path, store, manifest.with_search_options(path, options), device=device)

    # -- searching -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def final_query(self) -> bool:
        """Whether the query gradient is taken at the final checkpoint only (``source``): then slot ``c`` of a
        prepared query holds that one gradient, and the other checkpoints' query gradients are not needed."""
        return kind_traits(self.options.preconditioner).final_query

    def query_checkpoints(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[C]`` bool: the checkpoints whose query gradients :meth:`prepare_queries` reads for these weights."""
        weights = np.asarray(weights, dtype=np.float64)
        if not self.final_query:
            return weights != 0
        needed = np.zeros(len(self.checkpoints), dtype=bool)
        needed[-1] = bool((weights != 0).any())
        return needed

    def prepare_queries(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[B, C, D]`` raw projected query gradients -> ``[B, C*D]`` transformed, normalised, weighted.

        For ``source`` only the final checkpoint's slot of ``raw`` is read; it fills every weighted slot."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 3 or raw.shape[1] != len(self.checkpoints) or raw.shape[2] != self.dim:
            raise QueryShapeError(
                f"query vectors must have shape [B, {len(self.checkpoints)}, {self.dim}] "
                f"(queries, indexed checkpoints {self.checkpoints}, D), got {list(raw.shape)}"
            )
        b, c, d = raw.shape
        out = np.zeros((b, c, d), dtype=np.float32)
        final = len(self.checkpoints) - 1
        for j, name in enumerate(self.checkpoints):
            if weights[j] == 0:
                continue
            v = self.preconditioners[name].apply_query(raw[:, final if self.final_query else j])
            out[:, j] = (normalize_rows(v) if self.options.normalize else v) * np.float32(weights[j])
        return out.reshape(b, c * d)

    def search(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray, k: int) -> SearchResult:
        """Top-``k`` proponents and opponents of each query, with exact scores and per-checkpoint contributions."""
        queries = self.prepare_queries(raw, np.asarray(weights, dtype=np.float64))
        k = min(k, self.num_rows)
        found = self.backend.candidates(queries, k)
        # one fetch of the exact vectors of every candidate (all queries, proponents and opponents)
        rows = np.unique(np.concatenate([found.proponent_rows.ravel(), found.opponent_rows.ravel()]))
        rows = rows[rows >= 0]
        fetched = _Fetched(rows, self.exact_vectors(rows))
        pro = self._rescore(queries, found.proponent_rows, k, descending=True, fetched=fetched)
        opp = self._rescore(queries, found.opponent_rows, k, descending=False, fetched=fetched)
        return SearchResult(
            proponent_rows=pro.rows,
            proponent_scores=pro.scores,
            proponent_contributions=pro.contributions,
            opponent_rows=opp.rows,
            opponent_scores=opp.scores,
            opponent_contributions=opp.contributions,
            mean_abs_score=found.mean_abs_score,
            max_abs_score=found.max_abs_score,
        )

    def _rescore(
        self, queries: np.ndarray, candidates: np.ndarray, k: int, descending: bool, fetched: _Fetched
    ) -> _Ranked:
        """Exact float64 per-checkpoint contributions of the candidates; keep the best ``k`` of each query."""
        b = len(queries)
        c = len(self.checkpoints)
        ranked = _Ranked(np.full((b, k), -1, dtype=np.int64), np.zeros((b, k)), np.zeros((b, k, c)))
        for j in range(b):
            rows = np.unique(candidates[j][candidates[j] >= 0])
            vectors = fetched.of(rows).astype(np.float64).reshape(len(rows), c, self.dim)
            contributions = np.einsum("ncd,cd->nc", vectors, queries[j].astype(np.float64).reshape(c, self.dim))
            scores = contributions.sum(1)
            order = np.lexsort((self.ids[rows], -scores if descending else scores))[:k]
            n = len(order)
            ranked.rows[j, :n] = rows[order]
            ranked.scores[j, :n] = scores[order]
            ranked.contributions[j, :n] = contributions[order]
        return ranked

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The exact ``[n, C*D]`` float32 vectors of index rows (from the backend, or re-read from the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        held = self.backend.exact_vectors(rows)
        if held is not None:
            return held
        if self._store_vectors is None:
            checkpoint_rows = {name: CheckpointRows(self.store, name) for name in self.checkpoints}
            self._store_vectors = VectorSource(checkpoint_rows, self.preconditioners, self.options.normalize, self.dim)
        return self._store_vectors.vectors(self.ids[rows]).vectors

    def self_influence(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[N, C]`` per-checkpoint contributions ``w_c ||T_c g_i,c||^2`` to each example's self-influence
        (``w_c <g_i,L, T_c g_i,c>`` for ``source``, whose query is the final checkpoint's gradient)."""
        return self.sqnorms * np.asarray(weights, dtype=np.float64)[None, :]

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GradientIndex({str(self.path)!r}, kind={o.kind}, preconditioner={o.preconditioner}, "
            f"normalize={o.normalize}, N={self.num_rows}, checkpoints={self.checkpoints})"
        )
