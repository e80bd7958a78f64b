"""What every evaluation of a run needs: its Task, training examples and ids, a query engine for the query
gradients, the methods (indexes) being compared, and where results and retrained models go."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradstore.logger import Task
from gradstore.projection import GradstoreError, kind_traits
from gradstore.server.errors import EvaluationError
from gradstore.server.run import Run
from gradstore.server.run.config import RunConfig
from gradstore.server.run.engine import QueryEngine, lr_weights

from .attribution import Method, aside_method, replaced, score_matrix


def evaluation_dir(config: RunConfig) -> Path:
    """``<run config's folder>/evaluation``: default home of results, retrained models and aside indexes."""
    return config.path.parent / "evaluation"


@dataclass
class EvaluationContext:
    """A run opened for evaluation. Build with :meth:`open`, or directly from parts (benchmarks, tests)."""

    task: Task
    engine: QueryEngine
    methods: list[Method]
    directory: Path  # evaluation folder: results default to <directory>/<evaluation>, retrains to <directory>/retrains
    config: RunConfig | None = None
    examples: Sequence = field(init=False)
    ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.examples = self.task.train_examples()
        self.ids = np.array([self.task.example_id(e, i) for i, e in enumerate(self.examples)], dtype=np.int64)
        if len(np.unique(self.ids)) != len(self.ids):
            raise EvaluationError(f"{type(self.task).__name__}.example_id gives some training examples the same id")

    @classmethod
    def open(
        cls,
        config: RunConfig,
        preconditioners: Sequence[str] = (),
        device: str | None = None,
        directory: Path | None = None,
        progress: bool = False,
    ) -> EvaluationContext:
        """The run's configured index, plus a ``flat`` re-index of its store for each other preconditioner
        (under ``<directory>/indexes``, reused while it matches the store)."""
        directory = directory or evaluation_dir(config)
        run = Run(config)
        store = run.open_store()
        index = run.open_index(store, device=device)
        methods = [Method(config.index.preconditioner, config.index, True, index.path, index)]
        for name in preconditioners:
            if name == config.index.preconditioner:
                continue  # the configured index is this preconditioner already
            options = replaced(config.index, name)
            eval_store = run.open_eval_store(name)
            suffix = "-normalized" if options.normalize else ""
            path = directory / "indexes" / f"{name}{suffix}.index"
            methods.append(aside_method(store, options, path, index.checkpoints, eval_store, progress))
        # query gradients at every checkpoint: an engine on an index that reads them all (not source's final only)
        every = [m.index for m in methods if m.index is not None and not m.index.scoring.final_query]
        engine = QueryEngine(
            config.make_task(),
            store,
            every[0] if every else index,
            {c.name: c.path for c in config.checkpoints},
            residency=config.query.residency,
            device=device or config.query.device,
            batch_size=config.query.batch_size,
        )
        return cls(engine.task, engine, methods, directory, config)

    def query_examples(self, payloads: Sequence[Mapping[str, Any]]) -> list:
        """The Task's examples of query payloads (a bad payload is a ``QueryError`` naming it)."""
        if not payloads:
            raise EvaluationError("no queries given; put one JSON payload per line in the --queries file")
        return self.engine.examples_from_payloads(payloads)

    def scores(
        self, queries: Sequence, measurement: str = "loss", lr_weighting: str = "schedule"
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Per usable method, ``[Q, N]`` scores of the training examples (in :attr:`ids` order) for each query, and
        the seconds each method's scoring took (query gradients are computed once, at every checkpoint, and shared).

        A method whose transform holds the lrs (``source``) is scored with the ``uniform`` weighting, the only one it
        takes; its entry's ``lr_weighting`` says so."""
        everywhere = np.ones(len(self.engine.checkpoints))
        start = time.perf_counter()
        raw = self.engine.query_gradients(list(queries), everywhere, measurement)  # type: ignore[arg-type]
        gradient_s = time.perf_counter() - start
        out, seconds = {}, {}
        for method in self.methods:
            if method.index is None:
                continue
            start = time.perf_counter()
            method.lr_weighting = "uniform" if kind_traits(method.options.preconditioner).lr_inside else lr_weighting
            try:
                weights = lr_weights(self.engine.lrs, method.lr_weighting)
                out[method.name] = score_matrix(method.index, raw, weights, self.ids)
            except GradstoreError as exc:  # e.g. a weighting this preconditioner refuses
                method.error = f"{type(exc).__name__}: {exc}"
                continue
            seconds[method.name] = gradient_s + time.perf_counter() - start
        if not out:
            raise EvaluationError(
                "no method could score the queries: " + "; ".join(m.error or "" for m in self.methods)
            )
        return out, seconds

    def usable(self) -> list[Method]:
        return [m for m in self.methods if m.index is not None and m.error is None]

    def output_dir(self, evaluation: str, out: Path | None = None) -> Path:
        path = Path(out) if out is not None else self.directory / evaluation
        path.mkdir(parents=True, exist_ok=True)
        return path
