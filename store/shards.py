"""Shards: an index as a list of row ranges, each a complete index of its kind, merged exactly at query time.

An index built with ``IndexOptions(shards=S)`` splits its rows (the store's example ids, sorted) into ``S``
contiguous ranges. Each shard is a unit of its own: ``flat`` shards are the index's row parts (one part file per
checkpoint each); a FAISS kind's shard is a whole FAISS index (trained on its own rows) in ``shards/<s>/``. The
manifest lists the shards (``IndexManifest.shards``); :meth:`IndexManifest.shard_view` is the manifest one shard
loads with. Preconditioners are fitted once, on every row, so every shard's vectors are those of the unsharded
index. An update keeps every shard and makes the new rows one more shard (built with the same transforms; the
shards then outnumber ``options.shards``); what changes the transforms or the checkpoints builds every shard again.

Searching (the local mode: one process, every shard): each shard proposes its candidates (for ``flat`` its exact
top / bottom ``k``; FAISS kinds ``k * rerank``), their union is re-scored exactly in float64 by
:class:`~gradstore.store.index.GradientIndex` (:meth:`Scoring.row_contributions`, a row's numbers independent of the
rows beside it) and ranked with ties broken by id: for ``flat`` (and any kind whose candidates hold the exact top
``k``) the ids and scores are bit for bit those of the unsharded index.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .index_options import IndexOptions
from .manifest import IndexManifest
from .scoring import PreparedQueries
from .search import BACKENDS, Candidates, SearchBackend
from .vectors import VectorSource

__all__ = ["ShardedBackend", "shard_ranges"]


def shard_ranges(num_rows: int, shards: int) -> list[list[int]]:
    """``[[start, stop]]`` of ``min(shards, num_rows)`` contiguous ranges of as equal size as can be."""
    bounds = np.linspace(0, num_rows, min(shards, max(num_rows, 1)) + 1).round().astype(int)
    return [[int(lo), int(hi)] for lo, hi in itertools.pairwise(bounds)]


class ShardedBackend:
    """Every shard's backend, searched together (a thread per shard: FAISS and the BLAS release the GIL) and its
    candidates merged into one set, in global rows."""

    def __init__(self, shards: list[tuple[int, int, SearchBackend]], workers: int | None = None):
        self.shards = shards  # (first row, stop, backend)
        self.num_rows = shards[-1][1] if shards else 0
        self.workers = workers if workers is not None else min(len(shards), 8)

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        """Shards are built by :meth:`GradientIndex.build` (each with its kind's backend), never through here."""
        raise NotImplementedError("build a sharded index with GradientIndex.build(store, IndexOptions(shards=...))")

    @classmethod
    def load(
        cls,
        directory: Path,
        options: IndexOptions,
        device: torch.device,
        manifest: IndexManifest | None = None,
        label: Path | None = None,
    ) -> ShardedBackend:
        manifest = manifest if manifest is not None else IndexManifest.read(directory)
        backend = BACKENDS[manifest.options.kind]
        loaded = []
        for s, entry in enumerate(manifest.shards):
            view = replace(manifest.shard_view(s), options=options)
            folder = directory / entry["dir"] if entry["dir"] else directory
            shown = (label if label is not None else directory) / entry["dir"] if entry["dir"] else label
            start, stop = entry["rows"]
            loaded.append((start, stop, backend.load(folder, options, device, manifest=view, label=shown)))
        return cls(loaded)

    @classmethod
    def verified_on_load(cls, manifest: IndexManifest) -> set[str]:
        backend = BACKENDS[manifest.options.kind]
        out: set[str] = set()
        for s, entry in enumerate(manifest.shards):
            prefix = entry["dir"] + "/" if entry["dir"] else ""
            out |= {prefix + name for name in backend.verified_on_load(manifest.shard_view(s))}
        return out

    def _map(self, fn):
        if self.workers <= 1 or len(self.shards) == 1:
            return [fn(shard) for shard in self.shards]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="gradstore-shard") as pool:
            return list(pool.map(fn, self.shards))

    def candidates(self, queries: PreparedQueries | np.ndarray, k: int) -> Candidates:
        """Every shard's candidates (its own ``k``, in global rows), side by side; mean / max ``|score|`` over every
        row when every shard scored all of its rows."""

        def one(shard: tuple[int, int, SearchBackend]) -> Candidates:
            start, stop, backend = shard
            found = backend.candidates(queries, min(k, stop - start))
            shift = lambda rows: np.where(rows >= 0, rows + start, -1)  # noqa: E731
            return found._replace(proponent_rows=shift(found.proponent_rows), opponent_rows=shift(found.opponent_rows))

        found = self._map(one)
        stats = all(f.mean_abs_score is not None for f in found)
        sizes = np.array([stop - start for start, stop, _ in self.shards], dtype=np.float64)
        return Candidates(
            proponent_rows=np.concatenate([f.proponent_rows for f in found], axis=1),
            opponent_rows=np.concatenate([f.opponent_rows for f in found], axis=1),
            mean_abs_score=sum(f.mean_abs_score * n for f, n in zip(found, sizes, strict=True)) / sizes.sum()
            if stats
            else None,
            max_abs_score=np.max([f.max_abs_score for f in found], axis=0) if stats else None,
        )

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """The exact vectors of ``rows`` from the shards holding them, or None when the shards do not hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out: np.ndarray | None = None
        for start, stop, backend in self.shards:
            inside = (rows >= start) & (rows < stop)
            if not inside.any():
                continue
            held = backend.exact_vectors(rows[inside] - start)
            if held is None:
                return None
            if out is None:
                out = np.empty((len(rows), held.shape[1]), dtype=np.float32)
            out[inside] = held
        return out if out is not None or len(rows) else None

    def close(self) -> None:
        for _, _, backend in self.shards:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
