"""The one owner of an index's scoring: ``score(q, i) = sum_c w_c <Q_c(q), T_c g_i,c>``.

Every score gradstore serves (search and its exact re-score, per-token explain, evaluation's score matrices,
self-influence) is computed here from per-checkpoint query vectors and *explicit* per-checkpoint weights:

* ``T_c``: checkpoint ``c``'s preconditioner (``Preconditioner.apply``), then unit normalisation when the index
  normalises (cosine), on the training side (:meth:`Scoring.index_vectors`);
* ``Q_c``: the query side (``Preconditioner.apply_query``, normalised likewise) of checkpoint ``c``'s query
  gradient; for ``source`` (SOURCE, Bae et al.) the query is the *final* checkpoint's gradient in every slot and
  the training side already carries ``eta_c K_c`` (:attr:`Scoring.final_query`);
* ``w_c``: the weights, one per indexed checkpoint, given explicitly (a zero weight drops the checkpoint:
  :attr:`PreparedQueries.active` lists the others, so no backend re-discovers them by testing for zeros).

:meth:`Scoring.contributions` returns the exact float64 per-checkpoint terms ``w_c <Q_c(q), T_c g_i,c>``; their
sum is the score. :meth:`Scoring.row_contributions` computes the same terms so that each row's numbers depend on that
row alone (no BLAS blocking over the rows): what a search re-scores its candidates with, so a sharded search, an
unsharded one and batch scoring agree to the bit whatever other rows are scored beside a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from gradstore.projection import Preconditioner, kind_traits, normalize_rows

from .errors import QueryShapeError

__all__ = ["PreparedQueries", "Scoring"]


class PreparedQueries(NamedTuple):
    """Queries ready to score: per checkpoint ``w_c Q_c(q)`` in float32, with the weights they carry."""

    vectors: np.ndarray  # [B, C, D] float32; slots of checkpoints not in ``active`` are zero
    weights: np.ndarray  # [C] float64, explicit
    active: np.ndarray  # [A] int: the checkpoints of nonzero weight, in index order

    @property
    def num_queries(self) -> int:
        return len(self.vectors)

    def concatenated(self) -> np.ndarray:
        """``[B, C*D]`` float32: the form a FAISS index over concatenated vectors is searched with."""
        b, c, d = self.vectors.shape
        return self.vectors.reshape(b, c * d)

    def checkpoint(self, c: int) -> np.ndarray:
        """``[D, B]`` contiguous float32 query matrix of checkpoint slot ``c`` (a scan's right-hand side)."""
        return np.ascontiguousarray(self.vectors[:, c].T)

    @classmethod
    def from_concatenated(cls, queries: np.ndarray, num_checkpoints: int, dim: int) -> PreparedQueries:
        """Already prepared ``[B, C*D]`` queries whose weights are folded in (every checkpoint counts as active)."""
        queries = np.asarray(queries, dtype=np.float32)
        return cls(
            queries.reshape(len(queries), num_checkpoints, dim),
            np.ones(num_checkpoints),
            np.arange(num_checkpoints),
        )


def as_prepared(queries: PreparedQueries | np.ndarray, num_checkpoints: int, dim: int) -> PreparedQueries:
    return (
        queries
        if isinstance(queries, PreparedQueries)
        else PreparedQueries.from_concatenated(queries, num_checkpoints, dim)
    )


class Scoring:
    """The scoring rules of one index: its checkpoints (in index order), preconditioners and normalisation."""

    def __init__(self, checkpoints: Sequence[str], preconditioners: Mapping[str, Preconditioner], normalize: bool):
        self.checkpoints = list(checkpoints)
        self.preconditioners = dict(preconditioners)
        self.normalize = normalize
        # source: the query is the final checkpoint's gradient, in every slot (SOURCE's rule, here only)
        self.final_query = any(kind_traits(p.kind).final_query for p in self.preconditioners.values())

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    # -- the query side ----------------------------------------------------------------------------
    def query_checkpoints(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[C]`` bool: the checkpoints whose query gradients :meth:`prepare` reads for these weights (``source``:
        only the final one, when any weight is nonzero)."""
        weights = np.asarray(weights, dtype=np.float64)
        if not self.final_query:
            return weights != 0
        needed = np.zeros(self.num_checkpoints, dtype=bool)
        needed[-1] = bool((weights != 0).any())
        return needed

    def query_slots(self, chosen: Sequence[str]) -> int:
        """How many query vectors a caller gives for the checkpoints ``chosen`` (``source``: one)."""
        return 1 if self.final_query else len(chosen)

    def place(self, given: np.ndarray, chosen: Sequence[str], dim: int) -> np.ndarray:
        """``[B, C, D]`` raw query gradients from ``[B, query_slots(chosen), D]`` given ones (zeros elsewhere)."""
        raw = np.zeros((len(given), self.num_checkpoints, dim), dtype=np.float32)
        if self.final_query:
            raw[:, -1] = given[:, 0]
            return raw
        for i, name in enumerate(chosen):
            raw[:, self.checkpoints.index(name)] = given[:, i]
        return raw

    def prepare(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray, dim: int) -> PreparedQueries:
        """``[B, C, D]`` raw projected query gradients and ``[C]`` weights -> :class:`PreparedQueries`
        (``w_c Q_c(q)``; for ``source`` only the final slot of ``raw`` is read and fills every weighted slot)."""
        raw = np.asarray(raw, dtype=np.float32)
        c = self.num_checkpoints
        if raw.ndim != 3 or raw.shape[1] != c or raw.shape[2] != dim:
            raise QueryShapeError(
                f"query vectors must have shape [B, {c}, {dim}] "
                f"(queries, indexed checkpoints {self.checkpoints}, D), got {list(raw.shape)}"
            )
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (c,):
            raise QueryShapeError(f"weights must have one value per indexed checkpoint ({c}), got {weights.shape}")
        active = np.flatnonzero(weights != 0)
        out = np.zeros(raw.shape, dtype=np.float32)
        for j in active.tolist():
            name = self.checkpoints[j]
            v = self.preconditioners[name].apply_query(raw[:, c - 1 if self.final_query else j])
            out[:, j] = (normalize_rows(v) if self.normalize else v) * np.float32(weights[j])
        return PreparedQueries(out, weights, active)

    # -- the training side -------------------------------------------------------------------------
    def index_vectors(
        self, raw: Mapping[str, np.ndarray], raw_final: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training rows -> ``([n, C'*D] float32 index vectors, [n, C'] float64 self-influence terms)`` for the
        checkpoints of ``raw`` (a subset, in index order). Self-influence is taken before normalisation:
        ``||T_c g_c||^2``, or ``<g_L, T_c g_c>`` for ``source`` (``raw_final``: the rows at the final checkpoint)."""
        parts, sqnorms = [], []
        for name, rows in raw.items():
            v = self.preconditioners[name].apply(rows)
            q = v if raw_final is None else self.preconditioners[name].apply_query(raw_final)
            sqnorms.append(np.einsum("nd,nd->n", q.astype(np.float64), v.astype(np.float64)))
            parts.append(normalize_rows(v) if self.normalize else v)
        return np.concatenate(parts, axis=1), np.stack(sqnorms, axis=1)

    # -- scores ------------------------------------------------------------------------------------
    @staticmethod
    def contributions(prepared: PreparedQueries, vectors: np.ndarray, query: int | None = None) -> np.ndarray:
        """Exact float64 per-checkpoint contributions ``w_c <Q_c(q), T_c g_i,c>`` of index ``vectors``
        (``[n, C*D]``): ``[B, n, C]``, or ``[n, C]`` for one ``query``. Inactive checkpoints contribute 0."""
        _, c, d = prepared.vectors.shape
        rows = np.asarray(vectors).reshape(len(vectors), c, d)
        picked = prepared.vectors if query is None else prepared.vectors[query : query + 1]
        out = np.zeros((len(picked), len(rows), c))
        for j in prepared.active.tolist():
            out[:, :, j] = picked[:, j].astype(np.float64) @ rows[:, j].astype(np.float64).T
        return out[0] if query is not None else out

    @staticmethod
    def row_contributions(prepared: PreparedQueries, vectors: np.ndarray, query: int) -> np.ndarray:
        """:meth:`contributions` ``[n, C]`` of one ``query``, each row's float64 terms computed from that row alone
        (a BLAS product blocks the rows, so a row's last bits there depend on which rows are beside it)."""
        _, c, d = prepared.vectors.shape
        rows = np.asarray(vectors).reshape(len(vectors), c, d)
        out = np.zeros((len(rows), c))
        for j in prepared.active.tolist():
            q = prepared.vectors[query, j].astype(np.float64)
            out[:, j] = np.einsum("nd,d->n", rows[:, j].astype(np.float64), q)  # no BLAS: one reduction per row
        return out

    @classmethod
    def scores(cls, prepared: PreparedQueries, vectors: np.ndarray) -> np.ndarray:
        """``[B, n]`` exact float64 scores of index ``vectors``."""
        return cls.contributions(prepared, vectors).sum(-1)

    @staticmethod
    def self_influence(sqnorms: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[N, C]`` per-checkpoint self-influence terms ``w_c ||T_c g_i,c||^2`` (``w_c <g_L, T_c g_c>``, source)."""
        return sqnorms * np.asarray(weights, dtype=np.float64)[None, :]

    def direction(self, prepared: PreparedQueries, j: int, gradient: np.ndarray) -> np.ndarray:
        """``a`` (float64, ``[D]``) with ``<a, g> = <prepared_j, T_j g> / ||T_j G||`` for every part ``g`` of the
        training gradient ``G`` at checkpoint ``j`` (``||T_j G|| = 1`` without normalisation): what per-token
        explain splits a contribution by. ``a = T_j^T prepared_j / ||T_j G||``."""
        preconditioner = self.preconditioners[self.checkpoints[j]]
        direction = preconditioner.adjoint(prepared.vectors[0, j].astype(np.float64))
        if not self.normalize:
            return direction
        norm = float(np.linalg.norm(preconditioner.apply(gradient[None].astype(np.float32)).astype(np.float64)))
        return direction / norm if norm > 0 else np.zeros_like(direction)  # a zero row stays zero, as normalize_rows
