"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): how well attribution scores predict retraining.

For random subsets ``S_s`` of the training set (each a fraction ``alpha`` of it, drawn with a seeded mask), the model
is retrained on ``S_s`` with several seeds and each query's output ``f_q(S_s)`` measured, averaged over seeds.
Attribution predicts ``g_q(S_s) = sum_{i in S_s} score(q, i)``; ``LDS_q = spearman_s(g_q(S_s), f_q(S_s))`` and the
LDS is its mean over queries. ``f`` is oriented so that larger means more of the output (``-loss``; see
:func:`~gradstore.evaluation.outputs.query_outputs`), which is what a positive score predicts.

Retraining results computed elsewhere come as an ``.npz`` file (:func:`load_retrain_results`) with arrays
``masks`` ``[S, N]`` bool (example ``ids[n]`` kept in subset ``s``), ``measurements`` ``[S, Q]`` (the raw
``Task.loss`` or ``Task.measurement`` of query ``q``, in the order of the queries file, averaged over seeds)
and ``ids`` ``[N]`` (training example ids, any order; every one must be indexed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradstore.server.errors import EvaluationError

from .context import EvaluationContext
from .outputs import orientation, query_outputs
from .retrain import Job, RetrainCache, TaskFactory, require, train_missing


def subset_masks(n: int, subsets: int, fraction: float, mask_seed: int = 0) -> np.ndarray:
    """``[subsets, n]`` bool masks, each keeping ``round(fraction * n)`` examples. Subset ``s`` depends only on
    ``(mask_seed, s)``, so asking for more subsets later keeps (and reuses the retrains of) the first ones."""
    if not 0.0 < fraction < 1.0:
        raise EvaluationError(f"fraction must be in (0, 1), got {fraction}")
    if subsets < 2:
        raise EvaluationError(f"LDS needs at least 2 subsets to rank, got {subsets}")
    keep = round(fraction * n)
    if not 0 < keep < n:
        raise EvaluationError(f"fraction {fraction} of {n} examples keeps {keep}; choose one that keeps some, not all")
    masks = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        masks[s, np.random.default_rng([mask_seed, s]).permutation(n)[:keep]] = True
    return masks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their mean rank."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra @ ra) * (rb @ rb)))
    return float(ra @ rb) / denominator if denominator > 0 else float("nan")


def lds_per_query(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """``[Q]`` Spearman correlations of predicted subset scores ``masks @ scores[q]`` with ``outputs[:, q]``.

    ``scores`` ``[Q, N]``, ``masks`` ``[S, N]``, ``outputs`` ``[S, Q]`` (oriented: larger = more of the output)."""
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # [S, Q]
    return np.array([spearman(predicted[:, q], outputs[:, q]) for q in range(predicted.shape[1])])


def summarize(per_query: np.ndarray) -> dict[str, Any]:
    """Mean (the LDS), spread and count of the defined per-query correlations."""
    defined = per_query[np.isfinite(per_query)]
    return {
        "lds": float(defined.mean()) if len(defined) else None,
        "std": float(defined.std()) if len(defined) else None,
        "queries": len(per_query),
        "undefined": int(len(per_query) - len(defined)),  # constant predictions or outputs
        "per_query": [None if not np.isfinite(v) else float(v) for v in per_query],
    }


def save_retrain_results(path: Path, masks: np.ndarray, measurements: np.ndarray, ids: np.ndarray) -> Path:
    """Write the documented retrain-results file (``masks``, ``measurements``, ``ids``)."""
    np.savez(path, masks=masks.astype(bool), measurements=measurements.astype(np.float64), ids=ids.astype(np.int64))
    return path


def load_retrain_results(path: Path, ids: np.ndarray, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [S, N], measurements [S, Q])`` of a retrain-results file, masks re-ordered to ``ids``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("masks", "measurements", "ids") if name in data}
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read retrain results {path}: {exc}") from None
    missing = [name for name in ("masks", "measurements", "ids") if name not in arrays]
    if missing:
        raise EvaluationError(
            f"retrain results {path} lack arrays {missing}; it needs masks [S, N], measurements [S, Q] and ids [N]"
        )
    masks, measurements, given = arrays["masks"], arrays["measurements"].astype(np.float64), arrays["ids"]
    if given.ndim != 1 or masks.ndim != 2 or masks.shape[1] != len(given) or masks.dtype != bool:
        raise EvaluationError(
            f"retrain results {path}: masks must be bool [S, N] and ids [N], got masks {masks.dtype} "
            f"{list(masks.shape)}, ids {list(given.shape)}"
        )
    if measurements.shape != (len(masks), queries):
        raise EvaluationError(
            f"retrain results {path}: measurements must be [S={len(masks)}, Q={queries}] (one column per query of "
            f"the queries file, in order), got {list(measurements.shape)}"
        )
    if not np.isfinite(measurements).all():
        raise EvaluationError(f"retrain results {path}: measurements hold NaN or Inf")
    if len(np.unique(given)) != len(given) or set(given.tolist()) != set(ids.tolist()):
        raise EvaluationError(
            f"retrain results {path}: ids must be the {len(ids)} training example ids, each once "
            f"({len(set(given.tolist()) - set(ids.tolist()))} unknown, {len(set(ids.tolist()) - set(given.tolist()))} "
            "missing)"
        )
    order = np.argsort(given)[np.searchsorted(np.sort(given), ids)]  # column of each of our ids in the file
    return masks[:, order], measurements


def retrained_measurements(
    cache: RetrainCache,
    masks: np.ndarray,
    seeds: int,
    queries: Sequence,
    measurement: str,
    progress: bool = False,
) -> np.ndarray:
    """``[S, Q]`` raw measurements of the queries on each subset's retrained models, averaged over the seeds."""
    out = np.zeros((len(masks), len(queries)))
    sign = orientation(cache.task, measurement)  # query_outputs orients; undo it to store the raw values
    for s in tqdm(range(len(masks)), desc="measuring", unit="subset", disable=not progress):
        for seed in range(seeds):
            model = cache.load(Job(np.flatnonzero(masks[s]), seed))
            out[s] += sign * query_outputs(cache.task, model, queries, measurement) / seeds
    return out


def evaluate_lds(
    ctx: EvaluationContext,
    payloads: Sequence[Mapping[str, Any]],
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 3,
    mask_seed: int = 0,
    measurement: str = "loss",
    lr_weighting: str = "schedule",
    workers: int = 1,
    task_factory: TaskFactory | None = None,
    retrain_results: Path | None = None,
    cache_dir: Path | None = None,
    out: Path | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """LDS of every method of ``ctx`` on the queries; ``None`` on a torchrun rank other than 0 (it only retrains).

    Without ``retrain_results``, retrains (cached, resumable, parallel) and writes the results as
    ``retrain_results.npz`` in ``out``, in the format ``--retrain-results`` reads."""
    queries = ctx.query_examples(payloads)
    out_dir = ctx.output_dir("lds", out)
    retrain: dict[str, Any] | None = None
    if retrain_results is not None:
        masks, measurements = load_retrain_results(Path(retrain_results), ctx.ids, len(queries))
        seeds = 0
    else:
        require(ctx.task, "train", "lds")
        if seeds < 1:
            raise EvaluationError(f"seeds must be at least 1, got {seeds}")
        masks = subset_masks(len(ctx.ids), subsets, fraction, mask_seed)
        cache = RetrainCache(cache_dir or ctx.directory / "retrains", ctx.task, ctx.ids)
        jobs = [Job(np.flatnonzero(m), seed) for m in masks for seed in range(seeds)]
        stats = train_missing(cache, jobs, workers, task_factory, progress)
        if stats.rank != 0:
            return None
        start = time.perf_counter()
        measurements = retrained_measurements(cache, masks, seeds, queries, measurement, progress)
        retrain = {**stats.as_dict(), "cache": str(cache.directory), "measure_s": round(time.perf_counter() - start, 3)}
        save_retrain_results(out_dir / "retrain_results.npz", masks, measurements, ctx.ids)
    outputs = orientation(ctx.task, measurement) * measurements
    scores, seconds = ctx.scores(queries, measurement, lr_weighting)
    methods = []
    for method in ctx.methods:
        entry = method.describe()
        if method.name in scores:
            entry.update(summarize(lds_per_query(scores[method.name], masks, outputs)), score_s=seconds[method.name])
        methods.append(entry)
    return {
        "evaluation": "lds",
        "config": str(ctx.config.path) if ctx.config is not None else None,
        "queries": len(queries),
        "examples": len(ctx.ids),
        "subsets": len(masks),
        "fraction": float(masks.mean()),
        "seeds": seeds,
        "mask_seed": mask_seed if retrain_results is None else None,
        "measurement": measurement,
        "lr_weighting": lr_weighting,
        "retrain_results": str(retrain_results)
        if retrain_results is not None
        else str(out_dir / "retrain_results.npz"),
        "retrain": retrain,
        "methods": methods,
        "out": str(out_dir),
    }
