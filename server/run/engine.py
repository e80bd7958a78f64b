"""In-process query engine: query gradients at every checkpoint, weighting, search, and result assembly.

Importable without FastAPI; the CLI and the HTTP app both wrap it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from gradstore.logger import GradientProjector, NonFiniteGradientError, Task, TaskError
from gradstore.projection import GradstoreError, kind_traits
from gradstore.store import (
    CheckpointNotFoundError,
    GradientIndex,
    GradientStore,
    UnknownExampleError,
)
from gradstore.store.scoring import PreparedQueries

from ..errors import ConfigError, QueryError, query_error
from .schemas import (
    LR_WEIGHTINGS,
    MEASUREMENTS,
    RESIDENCIES,
    ExplainRequest,
    ExplainResponse,
    Influence,
    InfluenceOptions,
    InfluenceRequest,
    InfluenceResponse,
    LrWeighting,
    Measurement,
    QueryResult,
    Residency,
    RunCheckpoint,
    RunCoverage,
    RunIndex,
    RunInfo,
    RunLayer,
    RunProjection,
    RunVerification,
    SelfInfluenceRequest,
    SelfInfluenceResponse,
    TokenShare,
)
from .weights import WeightsFile

__all__ = ["QueryEngine", "QueryError", "build_request", "influence_key", "lr_weights", "run_info"]

Request = TypeVar("Request", bound=BaseModel)


def build_request(model: type[Request], fields: Mapping[str, Any]) -> Request:
    """A request model built from in-process options (engine keywords, CLI flags); its refusal is a
    :class:`QueryError` worded as sentences (``top_k must be at least 1, got 0``)."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as exc:
        raise query_error(exc) from exc


def lr_weights(lrs: Sequence[float] | np.ndarray, lr_weighting: str) -> np.ndarray:
    """Checkpoint weights: ``schedule`` = the lrs, ``uniform`` = 1, ``normalized`` = lr / mean(lr)."""
    values = np.asarray(lrs, dtype=np.float64)
    if lr_weighting == "schedule":
        return values
    if lr_weighting == "uniform":
        return np.ones_like(values)
    if lr_weighting == "normalized":
        mean = values.mean() if len(values) else 0.0
        if mean == 0:
            raise QueryError("lr_weighting='normalized' needs checkpoints whose mean lr is not zero")
        return values / mean
    raise QueryError(f"lr_weighting must be one of {LR_WEIGHTINGS}, got {lr_weighting!r}")


def influence_key(request: InfluenceOptions) -> tuple:
    """What influence requests must share to be answered by one :meth:`QueryEngine.answer_influence_many` call:
    every scoring option (``top_k`` may differ)."""
    checkpoints = None if request.checkpoints is None else tuple(request.checkpoints)
    return (request.lr_weighting, checkpoints, request.measurement, request.normalize)


class QueryEngine:
    """Answers influence queries against one store + index.

    Args:
        task: the run's Task (builds the model, loads checkpoints, parses and describes examples).
        store, index: the logged gradients and their index (built from that store).
        checkpoint_paths: weights file of each indexed checkpoint (default: the path recorded in the store).
        residency: ``all`` keeps one model per checkpoint in memory (fast); ``one`` loads checkpoints in
            turn into a single model (memory-efficient, as the TracIn reference's memory-efficient mode).
        device: where query gradients are computed (default: CUDA when available, else CPU).
        batch_size: queries per forward/backward.
    """

    def __init__(
        self,
        task: Task,
        store: GradientStore,
        index: GradientIndex,
        checkpoint_paths: Mapping[str, str | Path] | None = None,
        residency: Residency = "all",
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        if residency not in RESIDENCIES:
            raise ConfigError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
        self.task, self.store, self.index = task, store, index
        self.checkpoints = list(index.checkpoints)
        self.lrs = np.array([index.lrs[name] for name in self.checkpoints])
        self.residency, self.batch_size = residency, batch_size
        default = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device) if device is not None else torch.device(default)
        self.weights_files = {name: self._weights_file(name, checkpoint_paths or {}) for name in self.checkpoints}
        self.paths = {name: file.path for name, file in self.weights_files.items()}
        self._adam = {name: store.adam_factors(name) for name in self.checkpoints}
        self._lock = threading.Lock()  # hooks hold per-call state: one gradient computation at a time
        base = task.build_model().to(self.device)
        self._projectors: dict[str, GradientProjector] = {}
        if residency == "all":
            for name in self.checkpoints:
                model = copy.deepcopy(base)
                self.weights_files[name].load_into(task, model)
                self._projectors[name] = GradientProjector(model, task, spec=store.spec)
            self._loaded: str | None = None
        else:
            self._shared = GradientProjector(base, task, spec=store.spec)
            self._loaded = None
        self._examples = task.train_examples()
        self._positions: dict[int, int] | None = None
        self._skipped: dict[str, set[int]] = {}  # per checkpoint: ids of GradScaler-skipped steps (read on demand)
        self._run_info: RunInfo | None = None
        # computes query gradients in place of this engine's models when set (a Ray Serve replica: ray_backend.py);
        # it takes and returns what query_gradients does
        self.gradient_service: Callable[[Sequence, np.ndarray, Measurement], np.ndarray] | None = None

    def _weights_file(self, name: str, given: Mapping[str, str | Path]) -> WeightsFile:
        """The checkpoint's weights file, checked against the sha256 the store records (or, for a run logged without
        one, the file as it is now) whenever it is loaded."""
        info = self.store.checkpoint_info(name)
        path = given.get(name) or info.weights_path
        if path is None:
            raise CheckpointNotFoundError(
                f"no weights file for checkpoint {name!r}: give its path in the run config ([[checkpoints]] path = ...)"
            )
        path = Path(path)
        if not path.exists():
            raise CheckpointNotFoundError(f"weights file {path} of checkpoint {name!r} does not exist")
        return WeightsFile(name, path, info.weights_sha256, rows=self.store.path / "checkpoints" / name)

    # -- options ---------------------------------------------------------------------------------
    def lr_weighting(self, requested: str | None) -> LrWeighting:
        """The weighting a request gets: the one it names, else ``schedule`` (TracIn), or ``uniform`` for an index
        whose transform holds the lrs (``source``)."""
        if requested is not None:
            return cast(LrWeighting, requested)
        return "uniform" if kind_traits(self.index.options.preconditioner).lr_inside else "schedule"

    def checkpoint_weights(self, checkpoints: Sequence[str] | None, lr_weighting: str | None) -> np.ndarray:
        """Weights ``[C]`` over the indexed checkpoints: the lr weighting on the subset, zero elsewhere.

        An index whose transform holds the lrs (``source``: ``eta_s K_s`` per segment) takes ``uniform`` only."""
        lr_weighting = self.lr_weighting(lr_weighting)
        preconditioner = self.index.options.preconditioner
        if kind_traits(preconditioner).lr_inside and lr_weighting != "uniform" and lr_weighting in LR_WEIGHTINGS:
            raise QueryError(
                f"the index's {preconditioner} preconditioner already weights each checkpoint's segment by its lr and "
                f"step count (eta K); lr_weighting={lr_weighting!r} would apply the lr twice: use "
                "lr_weighting='uniform' (a checkpoint subset then sums over those segments)"
            )
        if checkpoints is None:
            chosen = list(self.checkpoints)
        else:
            unknown = [c for c in checkpoints if c not in self.checkpoints]
            if unknown:
                raise CheckpointNotFoundError(f"unknown checkpoints {unknown}; the index has {self.checkpoints}")
            if not checkpoints:
                raise QueryError("checkpoints, when given, must name at least one checkpoint")
            chosen = list(dict.fromkeys(checkpoints))
        mask = np.array([c in chosen for c in self.checkpoints])
        weights = np.zeros(len(self.checkpoints))
        weights[mask] = lr_weights(self.lrs[mask], lr_weighting)
        return weights

    # -- query gradients -------------------------------------------------------------------------
    def _query_mask(self, weights: np.ndarray) -> np.ndarray:
        """``[C]`` 1 where the index reads the query gradient for these weights (source: the final checkpoint)."""
        return self.index.query_checkpoints(weights).astype(np.float64)

    def examples_from_payloads(self, payloads: Sequence[Mapping[str, Any]]) -> list:
        examples = []
        for i, payload in enumerate(payloads):
            try:
                examples.append(self.task.query_example(dict(payload)))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise QueryError(f"query {i} rejected by {type(self.task).__name__}: {exc}") from exc
        return examples

    def query_gradients(self, examples: Sequence, weights: np.ndarray, measurement: Measurement = "loss") -> np.ndarray:
        """Raw projected query gradients ``[B, C, D]`` at each checkpoint with a nonzero weight (zeros elsewhere)."""
        if measurement not in MEASUREMENTS:
            raise QueryError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
        if self.gradient_service is not None:
            out = self.gradient_service(examples, weights, measurement)
        else:
            out = self.local_query_gradients(examples, weights, measurement)
        if not np.isfinite(out).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(out))[:, 0]})
            raise QueryError(f"queries {bad} have non-finite (NaN/Inf) gradients")
        return out

    def local_query_gradients(self, examples: Sequence, weights: np.ndarray, measurement: Measurement) -> np.ndarray:
        """:meth:`query_gradients` with this engine's own checkpoint models."""
        out = np.zeros((len(examples), len(self.checkpoints), self.store.dim), dtype=np.float32)
        with self._lock:
            for j, name in enumerate(self.checkpoints):
                if weights[j] == 0:
                    continue
                projector = self._projector(name)
                with projector.adam_correction(self._adam[name]):
                    for lo in range(0, len(examples), self.batch_size):
                        batch = examples[lo : lo + self.batch_size]
                        grads = projector.project(batch, measurement=measurement == "measurement")
                        out[lo : lo + len(batch), j] = grads.detach().cpu().numpy()
        return out

    def _projector(self, name: str) -> GradientProjector:
        if self.residency == "all":
            return self._projectors[name]
        if self._loaded != name:
            self._loaded = None  # until the load below is known to be of the logged weights
            self.weights_files[name].load_into(self.task, self._shared.model)
            self._loaded = name
        return self._shared

    # -- answers ---------------------------------------------------------------------------------
    def influence(
        self,
        queries: Sequence[Mapping[str, Any]] | None = None,
        *,
        examples: Sequence | None = None,
        vectors: np.ndarray | Sequence | None = None,
        **options: Any,
    ) -> InfluenceResponse:
        """Keyword form of :meth:`answer_influence`: ``options`` are the :class:`InfluenceOptions` fields
        (``top_k``, ``lr_weighting``, ``checkpoints``, ``measurement``, ``normalize``), with their defaults."""
        if examples is None:
            request = build_request(InfluenceRequest, {"queries": queries, "vectors": vectors, **options})
            return self.answer_influence(request)
        if queries is not None or vectors is not None:
            raise QueryError("give exactly one of queries (payloads), examples, or vectors")
        return self.answer_influence(build_request(InfluenceOptions, options), examples=examples)

    def answer_influence(self, request: InfluenceOptions, examples: Sequence | None = None) -> InfluenceResponse:
        """Top-``k`` proponents and opponents of each query: an :class:`InfluenceRequest`'s payloads or vectors,
        or, for in-process callers, already-built ``examples`` with the request's options."""
        start = time.perf_counter()
        queries = vectors = None
        if isinstance(request, InfluenceRequest):
            queries, vectors = request.queries, request.vectors
        if (examples is None) == (queries is None and vectors is None):
            raise QueryError("give exactly one of queries (payloads), examples, or vectors")
        weights, chosen = self._scoring(request)
        if vectors is not None:
            raw = self._vectors(vectors, self._vector_order(request, chosen))
        else:
            if queries is not None:
                examples = self.examples_from_payloads(queries)
            if not examples:
                raise QueryError("no queries given")
            raw = self.query_gradients(list(examples), self._query_mask(weights), request.measurement)
        gradient_done = time.perf_counter()
        found = self.index.search(raw, weights, request.top_k)
        searched = time.perf_counter()
        results = self._results(found, range(len(raw)), examples, chosen, request.top_k)
        timings = {"gradient": (gradient_done - start) * 1e3, "search": (searched - gradient_done) * 1e3}
        return self._influence_response(request, results, weights, chosen, start, timings, searched)

    def answer_influence_many(self, requests: Sequence[InfluenceRequest]) -> list[InfluenceResponse | GradstoreError]:
        """Several :class:`InfluenceRequest` with the same scoring options (:func:`influence_key`; ``top_k`` may
        differ) answered with one gradient computation for all their queries and one search per distinct ``top_k``,
        split per request.

        A request whose payloads or vectors are refused gets its error in its place; an error of the merged
        computation (e.g. a non-finite query gradient) is raised, and the caller answers each request alone.
        Answers equal :meth:`answer_influence`'s in ids and order; scores may differ by float32 rounding, since
        a forward/backward over a larger batch is not bitwise identical per example."""
        start = time.perf_counter()
        if len({influence_key(r) for r in requests}) > 1:
            raise ValueError("answer_influence_many takes requests with the same scoring options only")
        first = requests[0]
        weights, chosen = self._scoring(first)
        out: list[InfluenceResponse | GradstoreError | None] = [None] * len(requests)
        examples: dict[int, list] = {}
        vectors: dict[int, np.ndarray] = {}
        for i, request in enumerate(requests):
            try:
                if request.vectors is not None:
                    vectors[i] = self._vectors(request.vectors, self._vector_order(request, chosen))
                else:
                    examples[i] = self.examples_from_payloads(request.queries or [])
            except GradstoreError as exc:
                out[i] = exc
        flat = [example for i in sorted(examples) for example in examples[i]]
        grads = self.query_gradients(flat, self._query_mask(weights), first.measurement) if flat else None
        gradient_done = time.perf_counter()
        parts: list[np.ndarray] = []
        where: dict[int, range] = {}
        lo = done = 0
        for i in sorted({*examples, *vectors}):
            if i in examples:
                assert grads is not None
                part, done = grads[done : done + len(examples[i])], done + len(examples[i])
            else:
                part = vectors[i]
            parts.append(part)
            where[i] = range(lo, lo + len(part))
            lo += len(part)
        raw = np.concatenate(parts) if parts else None
        for top_k in sorted({requests[i].top_k for i in where}):
            # one search per top_k: the top k of a search for more is not always the top k (rows tied at the k-th
            # score are picked by the backend's top-k, which may differ between k and a larger one)
            mine = [i for i in where if requests[i].top_k == top_k]
            picked = np.concatenate([np.arange(where[i].start, where[i].stop) for i in mine])
            searched_from = time.perf_counter()
            assert raw is not None
            found = self.index.search(raw[picked], weights, top_k)
            searched = time.perf_counter()
            timings = {"gradient": (gradient_done - start) * 1e3, "search": (searched - searched_from) * 1e3}
            lo = 0
            for i in mine:
                rows = range(lo, lo + len(where[i]))
                lo += len(where[i])
                results = self._results(found, rows, examples.get(i), chosen, top_k)
                out[i] = self._influence_response(requests[i], results, weights, chosen, start, timings, searched)
        return cast("list[InfluenceResponse | GradstoreError]", out)

    def _scoring(self, request: InfluenceOptions) -> tuple[np.ndarray, list[str]]:
        """A request's checkpoint weights ``[C]`` and chosen checkpoints (in index order), its options checked."""
        self._check_normalize(request.normalize)
        weights = self.checkpoint_weights(request.checkpoints, request.lr_weighting)
        return weights, [c for c in self.checkpoints if request.checkpoints is None or c in request.checkpoints]

    @staticmethod
    def _vector_order(request: InfluenceOptions, chosen: list[str]) -> list[str]:
        return chosen if request.checkpoints is None else list(dict.fromkeys(request.checkpoints))

    def _results(
        self, found: Any, rows: range, examples: Sequence | None, chosen: list[str], top_k: int
    ) -> list[QueryResult]:
        """The :class:`QueryResult` of search rows ``rows`` (``examples``: their query examples, in order), each
        list cut to ``top_k`` (the search may have been run for a larger one)."""
        k = min(top_k, self.index.num_rows)
        results = []
        for n, b in enumerate(rows):
            results.append(
                QueryResult(
                    query=self.task.describe(examples[n]) if examples is not None else None,
                    proponents=self._influences(
                        found.proponent_rows[b, :k],
                        found.proponent_scores[b, :k],
                        found.proponent_contributions[b, :k],
                        chosen,
                    ),
                    opponents=self._influences(
                        found.opponent_rows[b, :k],
                        found.opponent_scores[b, :k],
                        found.opponent_contributions[b, :k],
                        chosen,
                    ),
                    mean_abs_score=None if found.mean_abs_score is None else float(found.mean_abs_score[b]),
                    max_abs_score=None if found.max_abs_score is None else float(found.max_abs_score[b]),
                )
            )
        return results

    def _influence_response(
        self,
        request: InfluenceOptions,
        results: list[QueryResult],
        weights: np.ndarray,
        chosen: list[str],
        start: float,
        timings: dict[str, float],
        searched: float,
    ) -> InfluenceResponse:
        done = time.perf_counter()
        return InfluenceResponse(
            results=results,
            checkpoints=chosen,
            weights={c: float(w) for c, w in zip(self.checkpoints, weights) if c in chosen},
            lr_weighting=self.lr_weighting(request.lr_weighting),
            measurement=request.measurement,
            took_ms=(done - start) * 1e3,
            timings_ms={**timings, "assemble": (done - searched) * 1e3},
        )

    def _check_normalize(self, normalize: bool | None) -> None:
        if normalize is not None and normalize != self.index.options.normalize:
            raise QueryError(
                f"the index was built with normalize={self.index.options.normalize}; set [index] normalize = "
                f"{str(normalize).lower()} in the run config and rebuild it to query with normalize={normalize}"
            )

    def _vectors(self, vectors: np.ndarray | Sequence, chosen: list[str]) -> np.ndarray:
        try:
            given = np.asarray(vectors, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise QueryError(f"vectors must be a numeric [B, checkpoints, D] array ({exc})") from None
        final = self.index.final_query  # source: one vector, the query gradient at the final checkpoint
        expected = (self.index.scoring.query_slots(chosen), self.store.dim)
        if given.ndim != 3 or given.shape[1:] != expected or len(given) == 0:
            what = (
                f"the query gradient at the final checkpoint {self.checkpoints[-1]!r}, which the "
                f"{self.index.options.preconditioner} index scores every segment with"
                if final
                else f"one D-vector per chosen checkpoint {chosen}"
            )
            raise QueryError(
                f"vectors must have shape [B, {expected[0]}, {expected[1]}] ({what}), got {list(given.shape)}"
            )
        if not np.isfinite(given).all():
            raise QueryError("vectors contain NaN or Inf")
        return self.index.scoring.place(given, chosen, self.store.dim)

    def _influences(
        self, rows: np.ndarray, scores: np.ndarray, contributions: np.ndarray, chosen: list[str], roles: bool = True
    ) -> list[Influence]:
        out = []
        for row, score, contrib in zip(rows, scores, contributions):
            if row < 0:
                continue
            example_id = int(self.index.ids[row])
            out.append(
                Influence(
                    id=example_id,
                    score=float(score),
                    contributions={c: float(v) for c, v in zip(self.checkpoints, contrib) if c in chosen},
                    example=self.describe(example_id),
                    role=None if not roles else "proponent" if score > 0 else "opponent" if score < 0 else "neutral",
                )
            )
        return out

    def self_influence(self, **options: Any) -> SelfInfluenceResponse:
        """Keyword form of :meth:`answer_self_influence`: ``options`` are the :class:`SelfInfluenceRequest` fields."""
        return self.answer_self_influence(build_request(SelfInfluenceRequest, options))

    def answer_self_influence(self, request: SelfInfluenceRequest) -> SelfInfluenceResponse:
        """Training examples with the largest ``sum_c w_c ||G_i,c||^2`` (likely mislabeled or outliers)."""
        start = time.perf_counter()
        checkpoints = request.checkpoints
        weights = self.checkpoint_weights(checkpoints, request.lr_weighting)
        chosen = [c for c in self.checkpoints if checkpoints is None or c in checkpoints]
        contributions = self.index.self_influence(weights)
        scores = contributions.sum(1)
        order = np.lexsort((self.index.ids, -scores))[: request.top_k]
        results = self._influences(order, scores[order], contributions[order], chosen, roles=False)
        return SelfInfluenceResponse(
            results=results,
            checkpoints=chosen,
            weights={c: float(w) for c, w in zip(self.checkpoints, weights) if c in chosen},
            lr_weighting=self.lr_weighting(request.lr_weighting),
            took_ms=(time.perf_counter() - start) * 1e3,
        )

    # -- per-token explanations --------------------------------------------------------------------
    def explain(self, query: Mapping[str, Any], example_id: int, **options: Any) -> ExplainResponse:
        """Keyword form of :meth:`answer_explain`: ``options`` are the :class:`ScoringOptions` fields
        (``lr_weighting``, ``checkpoints``, ``measurement``, ``normalize``), with their defaults."""
        return self.answer_explain(build_request(ExplainRequest, {"query": query, "example_id": example_id, **options}))

    def answer_explain(self, request: ExplainRequest) -> ExplainResponse:
        """Each input position's share of training example ``example_id``'s score for the query.

        The score is linear in the example's gradient once the query side is fixed:
        ``score = sum_c <T_c^T p_c, G_c> / n_c`` with ``p_c`` the prepared (preconditioned, normalised, weighted)
        query, ``T_c`` the preconditioner and ``n_c = ||T_c G_c||`` when the index normalises (1 otherwise). The
        example is re-run at each checkpoint with its gradient split by position (``project_positions``), so
        ``G_c = sum_t G_c,t + rest_c`` and the position shares ``sum_c <T_c^T p_c, G_c,t> / n_c`` add up to the
        score exactly. Checkpoints where the example's step was skipped (GradScaler) count zero, as in the index.
        """
        start = time.perf_counter()
        self._check_normalize(request.normalize)
        weights = self.checkpoint_weights(request.checkpoints, request.lr_weighting)
        chosen = [c for c in self.checkpoints if request.checkpoints is None or c in request.checkpoints]
        example = self._examples[self._position(request.example_id)]
        query = self.examples_from_payloads([request.query])
        raw = self.query_gradients(query, self._query_mask(weights), request.measurement)
        prepared = self.index.prepare(raw, weights)
        shares, rest, contributions = self._position_scores(example, request.example_id, prepared, weights)
        labels = self._position_labels(example)
        count = max(len(shares), len(labels or ()))
        tokens = [
            TokenShare(
                position=t,
                text=labels[t] if labels is not None and t < len(labels) else None,
                share=float(shares[t]) if t < len(shares) else 0.0,
            )
            for t in range(count)
        ]
        return ExplainResponse(
            query=self.task.describe(query[0]),
            example_id=request.example_id,
            example=self.task.describe(example),
            score=float(sum(contributions.values())),
            stored_score=self._stored_score(request.example_id, prepared),
            contributions={c: contributions[c] for c in chosen},
            positions=len(shares),
            tokens=tokens,
            rest=rest,
            checkpoints=chosen,
            weights={c: float(w) for c, w in zip(self.checkpoints, weights) if c in chosen},
            lr_weighting=self.lr_weighting(request.lr_weighting),
            measurement=request.measurement,
            took_ms=(time.perf_counter() - start) * 1e3,
        )

    def _position_scores(
        self, example: Any, example_id: int, prepared: PreparedQueries, weights: np.ndarray
    ) -> tuple[np.ndarray, float, dict[str, float]]:
        """``(shares [T], rest, {checkpoint: contribution})`` of one training example (float64 sums)."""
        count: int | None = None
        shares: np.ndarray | None = None
        rest, contributions = 0.0, {}
        with self._lock:
            for j, name in enumerate(self.checkpoints):
                if weights[j] == 0:
                    continue
                if example_id in self._skipped_ids(name):
                    contributions[name] = 0.0
                    continue
                projector = self._projector(name)
                with projector.adam_correction(self._adam[name]):
                    split = projector.project_positions(example, positions=count)
                per_position = split.per_position.detach().cpu().double().numpy()
                remainder = split.rest.detach().cpu().double().numpy()
                if not (np.isfinite(per_position).all() and np.isfinite(remainder).all()):
                    raise NonFiniteGradientError(
                        f"training example {example_id} has non-finite (NaN/Inf) gradients at checkpoint {name!r}",
                        [example_id],
                    )
                count = len(per_position)
                direction = self.index.scoring.direction(prepared, j, per_position.sum(axis=0) + remainder)
                at_checkpoint = per_position @ direction
                shares = at_checkpoint if shares is None else shares + at_checkpoint
                rest += float(remainder @ direction)
                contributions[name] = float(at_checkpoint.sum() + remainder @ direction)
        return (np.zeros(count or 0) if shares is None else shares), rest, contributions

    def _skipped_ids(self, name: str) -> set[int]:
        if name not in self._skipped:
            self._skipped[name] = {int(i) for i in self.store.skipped_ids(name)}
        return self._skipped[name]

    def _stored_score(self, example_id: int, prepared: PreparedQueries) -> float | None:
        """The index's score of the example for the prepared query (as its search re-scores), or None."""
        row = self.index.row_of(example_id)
        if row is None:
            return None
        return float(self.index.score_rows(prepared, np.array([row]))[0, 0].sum())

    def _position_labels(self, example: Any) -> list[str] | None:
        labels = self.task.describe_positions(example)
        if labels is None:
            return None
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TaskError(
                f"{type(self.task).__name__}.describe_positions must return a list of strings or None, "
                f"got {type(labels).__name__}"
            )
        labels = list(labels)
        if not all(isinstance(label, str) for label in labels):
            raise TaskError(f"{type(self.task).__name__}.describe_positions must return strings only")
        return labels

    def describe(self, example_id: int) -> dict:
        """The Task's description of a training example, by id."""
        return self.task.describe(self._examples[self._position(example_id)])

    def _position(self, example_id: int) -> int:
        if type(self.task).example_id is Task.example_id:  # ids are positions
            if not 0 <= example_id < len(self._examples):
                last = len(self._examples) - 1
                raise UnknownExampleError(f"no training example with id {example_id} (ids are 0..{last})")
            return example_id
        if self._positions is None:
            self._positions = {int(self.task.example_id(self._examples[i], i)): i for i in range(len(self._examples))}
        if example_id not in self._positions:
            raise UnknownExampleError(f"no training example with id {example_id}")
        return self._positions[example_id]

    def run_info(self) -> RunInfo:
        """Run metadata: store, checkpoints, projection, index, and how queries are computed here (read once:
        the engine serves the store as it was when it was loaded)."""
        if self._run_info is None:
            self._run_info = run_info(self.store, self.index, residency=self.residency, device=str(self.device))
        return self._run_info.model_copy(deep=True)


def run_info(
    store: GradientStore,
    index: GradientIndex | None = None,
    *,
    index_error: GradstoreError | None = None,
    residency: Residency | None = None,
    device: str | None = None,
) -> RunInfo:
    """The :class:`RunInfo` of a store and its index (or the error that keeps the index from serving)."""
    spec = store.spec
    if index is not None:
        options = index.options
        index_info = RunIndex(
            status="ready",
            path=str(index.path),
            kind=options.kind,
            preconditioner=options.preconditioner,
            normalize=options.normalize,
            rows=index.num_rows,
            checkpoints=list(index.checkpoints),
        )
    else:
        index_info = RunIndex(status="unusable", reason=str(index_error) if index_error is not None else None)
    checks = store.checks()
    verifications = checks.get("verification", {})
    checkpoints = []
    for name in store.checkpoints:
        info = store.checkpoint_info(name)
        rows = store.num_rows(name)
        check = verifications.get(name, verifications.get("*"))
        checkpoints.append(
            RunCheckpoint(
                name=name,
                lr=info.lr,
                step=info.step,
                rows=rows,
                adam=info.adam,
                verification=RunVerification.model_validate(check, strict=False) if check else None,
            )
        )
    return RunInfo(
        store=str(store.path),
        dtype=store.dtype,
        dim=store.dim,
        projection=RunProjection(
            init=spec.init,
            seed=spec.seed,
            dim=spec.dim,
            layers=[RunLayer(name=la.name, kind=la.kind, k_in=la.k_in, k_out=la.k_out) for la in spec.layers],
        ),
        checkpoints=checkpoints,
        coverage=RunCoverage.model_validate(checks["coverage"]) if "coverage" in checks else None,
        index=index_info,
        residency=residency,
        device=device,
    )
