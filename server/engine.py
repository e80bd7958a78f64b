"""In-process query engine: query gradients at every checkpoint, weighting, search, and result assembly.

Importable without FastAPI; the CLI and the HTTP app both wrap it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gradstore.logger import GradientLogger, Task
from gradstore.projection import GradstoreError
from gradstore.store import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    GradientIndex,
    GradientStore,
    UnknownExampleError,
    file_sha256,
)

from .schemas import Influence, InfluenceResponse, LrWeighting, Measurement, QueryResult, SelfInfluenceResponse

Residency = Literal["all", "one"]


class QueryError(GradstoreError, ValueError):
    """A query the engine cannot answer as asked (bad payload, bad option); the message says why."""


def lr_weights(lrs: Sequence[float], lr_weighting: str) -> np.ndarray:
    """Checkpoint weights: ``schedule`` = the lrs, ``uniform`` = 1, ``normalized`` = lr / mean(lr)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    if lr_weighting == "schedule":
        return lrs
    if lr_weighting == "uniform":
        return np.ones_like(lrs)
    if lr_weighting == "normalized":
        mean = lrs.mean() if len(lrs) else 0.0
        if mean == 0:
            raise QueryError("lr_weighting='normalized' needs checkpoints whose mean lr is not zero")
        return lrs / mean
    raise QueryError(f"lr_weighting must be 'schedule', 'uniform' or 'normalized', got {lr_weighting!r}")


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
        if residency not in ("all", "one"):
            raise ValueError(f"residency must be 'all' or 'one', got {residency!r}")
        self.task, self.store, self.index = task, store, index
        self.checkpoints = list(index.checkpoints)
        self.lrs = np.array([index.lrs[name] for name in self.checkpoints])
        self.residency, self.batch_size = residency, batch_size
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.paths = {name: self._weights_path(name, checkpoint_paths or {}) for name in self.checkpoints}
        self._adam = {name: store.adam_factors(name) for name in self.checkpoints}
        self._lock = threading.Lock()  # hooks hold per-call state: one gradient computation at a time
        base = task.build_model().to(self.device)
        self._loggers: dict[str, GradientLogger] = {}
        if residency == "all":
            for name in self.checkpoints:
                model = copy.deepcopy(base)
                task.load_checkpoint(model, self.paths[name])
                self._loggers[name] = GradientLogger(model, task, spec=store.spec, progress=False)
            self._loaded: str | None = None
        else:
            self._shared = GradientLogger(base, task, spec=store.spec, progress=False)
            self._loaded = None
        self._examples = task.train_examples()
        self._positions: dict[int, int] | None = None

    def _weights_path(self, name: str, given: Mapping[str, str | Path]) -> Path:
        info = self.store.checkpoint_info(name)
        path = given.get(name) or info.weights_path
        if path is None:
            raise CheckpointNotFoundError(
                f"no weights file for checkpoint {name!r}: give its path in the run config ([[checkpoints]] path = ...)"
            )
        path = Path(path)
        if not path.exists():
            raise CheckpointNotFoundError(f"weights file {path} of checkpoint {name!r} does not exist")
        if info.weights_sha256 is not None and file_sha256(path) != info.weights_sha256:
            raise CheckpointMismatchError(
                f"weights file {path} differs from the one checkpoint {name!r} was logged with (sha256 mismatch); "
                "query gradients must come from the same weights"
            )
        return path

    # -- options ---------------------------------------------------------------------------------
    def select(self, checkpoints: Sequence[str] | None, lr_weighting: str) -> np.ndarray:
        """Weights ``[C]`` over the indexed checkpoints: the lr weighting on the subset, zero elsewhere."""
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
        if measurement not in ("loss", "measurement"):
            raise QueryError(f"measurement must be 'loss' or 'measurement', got {measurement!r}")
        out = np.zeros((len(examples), len(self.checkpoints), self.store.dim), dtype=np.float32)
        with self._lock:
            for j, name in enumerate(self.checkpoints):
                if weights[j] == 0:
                    continue
                logger = self._logger(name)
                with logger.adam_correction(self._adam[name]):
                    for lo in range(0, len(examples), self.batch_size):
                        batch = examples[lo : lo + self.batch_size]
                        grads = logger.project(batch, measurement=measurement == "measurement")
                        out[lo : lo + len(batch), j] = grads.detach().cpu().numpy()
        if not np.isfinite(out).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(out))[:, 0]})
            raise QueryError(f"queries {bad} have non-finite (NaN/Inf) gradients")
        return out

    def _logger(self, name: str) -> GradientLogger:
        if self.residency == "all":
            return self._loggers[name]
        if self._loaded != name:
            self.task.load_checkpoint(self._shared.model, self.paths[name])
            self._loaded = name
        return self._shared

    # -- answers ---------------------------------------------------------------------------------
    def influence(
        self,
        queries: Sequence[Mapping[str, Any]] | None = None,
        *,
        examples: Sequence | None = None,
        vectors: np.ndarray | Sequence | None = None,
        top_k: int = 10,
        lr_weighting: LrWeighting = "schedule",
        checkpoints: Sequence[str] | None = None,
        measurement: Measurement = "loss",
        normalize: bool | None = None,
    ) -> InfluenceResponse:
        """Top-``k`` proponents and opponents for each query (payloads, examples, or precomputed vectors)."""
        start = time.perf_counter()
        if sum(x is not None for x in (queries, examples, vectors)) != 1:
            raise QueryError("give exactly one of queries (payloads), examples, or vectors")
        if top_k < 1:
            raise QueryError(f"top_k must be at least 1, got {top_k}")
        if normalize is not None and normalize != self.index.options.normalize:
            raise QueryError(
                f"the index was built with normalize={self.index.options.normalize}; set [index] normalize = "
                f"{str(normalize).lower()} in the run config and rebuild it to query with normalize={normalize}"
            )
        weights = self.select(checkpoints, lr_weighting)
        chosen = [c for c in self.checkpoints if checkpoints is None or c in checkpoints]
        if vectors is not None:
            raw = self._vectors(vectors, chosen if checkpoints is None else list(dict.fromkeys(checkpoints)))  # request order
        else:
            if queries is not None:
                examples = self.examples_from_payloads(queries)
            if not examples:
                raise QueryError("no queries given")
            raw = self.query_gradients(list(examples), weights, measurement)
        gradient_done = time.perf_counter()
        found = self.index.search(raw, weights, top_k)
        searched = time.perf_counter()
        results = []
        for b in range(len(raw)):
            results.append(
                QueryResult(
                    query=self.task.describe(examples[b]) if examples is not None else None,
                    proponents=self._influences(found.proponent_rows[b], found.proponent_scores[b], found.proponent_contributions[b], chosen),
                    opponents=self._influences(found.opponent_rows[b], found.opponent_scores[b], found.opponent_contributions[b], chosen),
                    mean_abs_score=None if found.mean_abs_score is None else float(found.mean_abs_score[b]),
                    max_abs_score=None if found.max_abs_score is None else float(found.max_abs_score[b]),
                )
            )
        done = time.perf_counter()
        return InfluenceResponse(
            results=results,
            checkpoints=chosen,
            weights={c: float(w) for c, w in zip(self.checkpoints, weights) if c in chosen},
            lr_weighting=lr_weighting,
            measurement=measurement,
            took_ms=(done - start) * 1e3,
            timings_ms={
                "gradient": (gradient_done - start) * 1e3,
                "search": (searched - gradient_done) * 1e3,
                "assemble": (done - searched) * 1e3,
            },
        )

    def _vectors(self, vectors: np.ndarray | Sequence, chosen: list[str]) -> np.ndarray:
        try:
            given = np.asarray(vectors, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise QueryError(f"vectors must be a numeric [B, checkpoints, D] array ({exc})") from None
        expected = (len(chosen), self.store.dim)
        if given.ndim != 3 or given.shape[1:] != expected or len(given) == 0:
            raise QueryError(
                f"vectors must have shape [B, {expected[0]}, {expected[1]}] (one D-vector per chosen checkpoint {chosen}), "
                f"got {list(given.shape)}"
            )
        if not np.isfinite(given).all():
            raise QueryError("vectors contain NaN or Inf")
        raw = np.zeros((len(given), len(self.checkpoints), self.store.dim), dtype=np.float32)
        for i, name in enumerate(chosen):
            raw[:, self.checkpoints.index(name)] = given[:, i]
        return raw

    def _influences(self, rows: np.ndarray, scores: np.ndarray, contributions: np.ndarray, chosen: list[str]) -> list[Influence]:
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
                )
            )
        return out

    def self_influence(
        self, top_k: int = 20, lr_weighting: LrWeighting = "schedule", checkpoints: Sequence[str] | None = None
    ) -> SelfInfluenceResponse:
        """Training examples with the largest ``sum_c w_c ||G_i,c||^2`` (likely mislabeled or outliers)."""
        start = time.perf_counter()
        if top_k < 1:
            raise QueryError(f"top_k must be at least 1, got {top_k}")
        weights = self.select(checkpoints, lr_weighting)
        chosen = [c for c in self.checkpoints if checkpoints is None or c in checkpoints]
        contributions = self.index.self_influence(weights)
        scores = contributions.sum(1)
        order = np.lexsort((self.index.ids, -scores))[:top_k]
        results = self._influences(order, scores[order], contributions[order], chosen)
        return SelfInfluenceResponse(
            results=results,
            checkpoints=chosen,
            weights={c: float(w) for c, w in zip(self.checkpoints, weights) if c in chosen},
            lr_weighting=lr_weighting,
            took_ms=(time.perf_counter() - start) * 1e3,
        )

    def describe(self, example_id: int) -> dict:
        """The Task's description of a training example, by id."""
        return self.task.describe(self._examples[self._position(example_id)])

    def _position(self, example_id: int) -> int:
        if type(self.task).example_id is Task.example_id:  # ids are positions
            if not 0 <= example_id < len(self._examples):
                raise UnknownExampleError(f"no training example with id {example_id} (ids are 0..{len(self._examples) - 1})")
            return example_id
        if self._positions is None:
            self._positions = {int(self.task.example_id(self._examples[i], i)): i for i in range(len(self._examples))}
        if example_id not in self._positions:
            raise UnknownExampleError(f"no training example with id {example_id}")
        return self._positions[example_id]

    def run_info(self) -> dict:
        """Run metadata: checkpoints with lrs, projection, index kind and options, N and D."""
        spec = self.store.spec
        options = self.index.options
        return {
            "store": str(self.store.path),
            "index": str(self.index.path),
            "checkpoints": [
                {"name": c, "lr": float(lr), "step": self.store.checkpoint_info(c).step, "adam": self._adam[c] is not None}
                for c, lr in zip(self.checkpoints, self.lrs)
            ],
            "projection": {
                "init": spec.init,
                "seed": spec.seed,
                "dim": spec.dim,
                "layers": [{"name": l.name, "kind": l.kind, "k_in": l.k_in, "k_out": l.k_out} for l in spec.layers],
            },
            "index_kind": options.kind,
            "preconditioner": options.preconditioner,
            "normalize": options.normalize,
            "num_examples": self.index.num_rows,
            "dim": self.store.dim,
            "device": str(self.device),
            "residency": self.residency,
        }
