"""Helpers for the search / query-engine tests: a queryable MLP task, logged runs, synthetic stores, references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradstore.logger import GradientLogger, Task
from gradstore.projection import ProjectionSpec, build_matrices, matrices_checksum
from gradstore.store import CheckpointInfo, GradientStore

from .models import MLPTask, flat_full_gradients, per_example_canonical_grads, sgd_steps


class QueryMLPTask(MLPTask):
    """:class:`MLPTask` with JSON query payloads ``{"x": [10 numbers], "y": class}`` and a margin measurement."""

    def query_example(self, payload: dict):
        x, y = payload.get("x"), payload.get("y")
        if not isinstance(x, list) or len(x) != self.dim or not all(isinstance(v, (int, float)) for v in x):
            raise ValueError(f'"x" must be a list of {self.dim} numbers')
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < self.classes:
            raise ValueError(f'"y" must be a class in 0..{self.classes - 1}, got {y!r}')
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    def measurement(self, model, batch):
        """Negative margin of the labelled class."""
        x, y = batch
        logits = model(x)
        true = logits.gather(1, y[:, None])[:, 0]
        mask = torch.arange(self.classes, device=y.device)[None, :] == y[:, None]  # (one_hot does not vmap)
        other = logits.masked_fill(mask, float("-inf")).max(1).values
        return other - true


class MeasurementAsLoss(Task):
    """Wraps a task so the reference gradients (``per_example_canonical_grads``) are of its measurement."""

    def __init__(self, task: Task):
        self.task = task

    def collate(self, examples):
        return self.task.collate(examples)

    def loss(self, model, batch):
        return self.task.measurement(model, batch)


def payload(example) -> dict:
    x, y = example
    return {"x": x.tolist(), "y": int(y)}


@dataclass
class LoggedRun:
    """A tiny MLP logged at several SGD checkpoints, with everything needed for exact references."""

    task: QueryMLPTask
    store_path: Path
    names: list[str]
    lrs: list[float]
    weights: dict[str, Path]
    layers: list  # the logger's layer handles (names and adapters for the reference gradients)

    def model_at(self, name: str) -> torch.nn.Module:
        model = self.task.build_model()
        self.task.load_checkpoint(model, self.weights[name])
        return model

    def full_gradients(self, name: str, examples, task: Task | None = None) -> torch.Tensor:
        """Exact ``[n, P]`` float64 full per-example gradients at checkpoint ``name`` (torch.func)."""
        canonical = per_example_canonical_grads(self.model_at(name), task or self.task, list(examples), self.layers)
        return flat_full_gradients(canonical, [layer.name for layer in self.layers])

    def projected(self, name: str, examples, store: GradientStore) -> np.ndarray:
        """Query vectors projected at checkpoint ``name`` by an independent logger with the store's spec."""
        logger = GradientLogger(self.model_at(name), self.task, spec=store.spec, progress=False)
        try:
            return logger.project(list(examples)).double().numpy()
        finally:
            logger.close()


def log_mlp_run(
    directory: Path,
    lrs=(0.1, 0.05, 0.02),
    n: int = 96,
    rank=10**6,
    init: str = "orthonormal",
    dtype: str = "float32",
    store_name: str = "run.zarr",
    eval_examples=None,
) -> LoggedRun:
    """Log ``n`` examples at ``len(lrs)`` checkpoints 5 SGD steps apart; optionally an eval store ``eval.zarr``."""
    task = QueryMLPTask(n=n)
    torch.manual_seed(0)
    model = task.build_model()
    logger = GradientLogger(
        model, task, store=directory / store_name, rank=rank, init=init, dtype=dtype, progress=False
    )
    eval_logger = None
    if eval_examples is not None:
        eval_model = task.build_model()  # its own hooks: two loggers must not hook the same modules
        eval_logger = GradientLogger(
            eval_model, task, store=directory / "eval.zarr", spec=logger.spec, dtype=dtype, progress=False
        )
    names, weights = [], {}
    for c, lr in enumerate(lrs):
        if c:
            sgd_steps(model, task, steps=5, lr=0.5, seed=c)
        name = f"ckpt-{c}"
        path = directory / f"{name}.pt"
        torch.save(model.state_dict(), path)
        logger.log_checkpoint(name, lr=lr, batch_size=32, step=c * 5, weights_path=path)
        if eval_logger is not None:
            eval_logger.model.load_state_dict(model.state_dict())
            eval_logger.log_checkpoint(
                name, lr=lr, examples=eval_examples, batch_size=32, step=c * 5, weights_path=path
            )
        names.append(name)
        weights[name] = path
    logger.close()
    if eval_logger is not None:
        eval_logger.close()
    return LoggedRun(task, directory / store_name, names, list(lrs), weights, logger.layers)


def reference_weights(lrs, lr_weighting: str) -> np.ndarray:
    lrs = np.asarray(lrs, dtype=np.float64)
    return {"schedule": lrs, "uniform": np.ones_like(lrs), "normalized": lrs / lrs.mean()}[lr_weighting]


def dense_curvature(
    kind: str, train: np.ndarray, eval: np.ndarray | None, mix: float, damping: float, spec
) -> np.ndarray:
    """Block-diagonal ``R`` ``[D, D]`` built independently: per layer ``block`` or ``kfac``, mixed and damped."""
    R = np.zeros((spec.dim, spec.dim))
    for layer in spec.layers:
        sl = layer.slice

        def moments(rows, sl=sl, layer=layer):
            g = rows[:, sl].astype(np.float64)
            if kind == "block":
                return [g.T @ g / len(g)]
            m = g.reshape(len(g), layer.k_out, layer.k_in)
            return [
                sum(mi @ mi.T for mi in m) / len(m),  # S = E[M M^T]
                sum(mi.T @ mi for mi in m) / len(m),  # A = E[M^T M]
                sum(float((mi**2).sum()) for mi in m) / len(m),  # E||M||^2
            ]

        stats = moments(train)
        if eval is not None:
            stats = [mix * e + (1 - mix) * t for t, e in zip(stats, moments(eval))]

        def damp(x):
            return x + damping * np.trace(x) / len(x) * np.eye(len(x))

        if kind == "block":
            R[sl, sl] = damp(stats[0])
        else:
            S, A, sq = stats
            # M is stored row-major (k_out x k_in): vec_r(S X A) = (S kron A^T) vec_r(X), and A is symmetric
            R[sl, sl] = np.kron(damp(S), damp(A)) / sq
    return R


# -- synthetic stores ------------------------------------------------------------------------------


def synthetic_spec(layers: list[tuple[str, int, int]], init: str = "gaussian") -> ProjectionSpec:
    """A spec with linear layers ``(name, k_in, k_out)`` at full rank (``d_in + 1 = k_in``, ``d_out = k_out``)."""
    spec = ProjectionSpec.build(
        [(name, "linear", k_in - 1, k_out, True) for name, k_in, k_out in layers], 10**6, init=init
    )
    return spec.with_checksum(matrices_checksum(build_matrices(spec, verify=False)))


def write_store(
    path: Path,
    spec: ProjectionSpec,
    checkpoints: dict[str, tuple[float, np.ndarray]],
    dtype: str = "float32",
    chunk_rows: int = 1024,
    ids: np.ndarray | None = None,
    committed_rows: int | None = None,
) -> GradientStore:
    """A store with one pass segment per checkpoint ``{name: (lr, [N, D] rows)}``; ids default to ``0..N-1``.

    ``committed_rows`` commits only the chunks covering that many rows (the rest look unfinished).
    """
    store = GradientStore.open_or_create(path, spec, dtype=dtype, chunk_rows=chunk_rows)
    for name, (lr, rows) in checkpoints.items():
        n = len(rows)
        row_ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if name not in store.checkpoints:
            store.begin_checkpoint(CheckpointInfo(name=name, lr=float(lr)))
        segment = store.pass_segment(name, n)
        counts = segment.committed_counts()
        stop = n if committed_rows is None else committed_rows
        for chunk in range(segment.n_chunks):
            lo, hi = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
            if lo >= stop or counts[chunk]:
                continue
            segment.write_chunk(chunk, row_ids[lo:hi], rows[lo:hi].astype(dtype))
    return store


def gradient_like(
    rng: np.random.Generator, n: int, dim: int, clusters: int = 64, rank: int = 32, basis=None, centers=None
):
    """Rows that look like per-example gradients: clustered in a low-rank subspace, plus noise, heavy-tailed norms.

    Returns ``(rows, basis, centers)`` so queries can be drawn from the same distribution.
    """
    if basis is None:
        basis = rng.standard_normal((rank, dim)) / np.sqrt(rank)
        centers = rng.standard_normal((clusters, rank)) * 2.0
    labels = rng.integers(len(centers), size=n)
    latent = centers[labels] + rng.standard_normal((n, len(basis)))
    rows = latent @ basis + 0.3 * rng.standard_normal((n, dim))
    rows *= rng.lognormal(0.0, 1.0, size=(n, 1))  # a few examples have gradients orders of magnitude larger
    return rows.astype(np.float32), basis, centers


def all_scores(index, raw: np.ndarray, weights) -> np.ndarray:
    """Every row's score from ``index`` (a GradientIndex), via a top-N search (exercises ranking and rescoring too);
    each query's opponents must then be every row too."""
    found = index.search(raw, weights, index.num_rows)
    out = np.zeros((len(raw), index.num_rows))
    for b in range(len(raw)):
        out[b, found.proponent_rows[b]] = found.proponent_scores[b]
        np.testing.assert_array_equal(np.sort(found.opponent_rows[b]), np.arange(index.num_rows))
    return out
