"""Brittleness (Ilyas et al. 2022; TRAK): remove a query's top-``k`` proponents, retrain, and see whether its
prediction flips, against removing ``k`` random training examples.

For each seed the model is first retrained on the whole training set; the queries it predicts correctly
(``Task.correct``) are the ones tested at that seed. For each such query, ``k`` and method, the model is retrained
with the same seed on the training set minus the query's ``k`` highest-scored examples (ties: lower id first), and
the query counts as flipped when that model's prediction is wrong. The random baseline removes ``k`` examples drawn
with a seed of its own per (query, k, seed, draw). Reported: flipped / tested, per method and ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradstore.server.errors import EvaluationError

from .context import EvaluationContext
from .outputs import model_device
from .retrain import Job, RetrainCache, TaskFactory, require, train_missing

RANDOM = "random"


def top_positions(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores (ties: lower id first), as the index ranks proponents."""
    return np.lexsort((ids, -scores))[:k]


def random_positions(n: int, k: int, seed: Sequence[int]) -> np.ndarray:
    return np.random.default_rng(list(seed)).choice(n, size=k, replace=False)


def correct(ctx: EvaluationContext, model: torch.nn.Module, queries: Sequence) -> np.ndarray:
    """``[Q]`` bool: ``Task.correct`` of each query on ``model``."""
    from gradstore.logger.task import move_to_device

    with torch.no_grad():
        batch = move_to_device(ctx.task.collate(list(queries)), model_device(model))
        out = ctx.task.correct(model, batch)
    out = torch.as_tensor(out)
    if out.shape != (len(queries),):
        raise EvaluationError(
            f"{type(ctx.task).__name__}.correct must return one bool per example, shape [{len(queries)}], "
            f"got {list(out.shape)}"
        )
    return out.detach().cpu().numpy().astype(bool)


def evaluate_brittleness(
    ctx: EvaluationContext,
    payloads: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (10, 20, 40),
    seeds: int = 1,
    random_draws: int = 1,
    random_seed: int = 0,
    measurement: str = "loss",
    lr_weighting: str = "schedule",
    workers: int = 1,
    task_factory: TaskFactory | None = None,
    cache_dir: Path | None = None,
    out: Path | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Flip fractions of top-``k`` removal per method and of random removal; ``None`` on torchrun ranks > 0."""
    require(ctx.task, "train", "brittleness")
    require(ctx.task, "correct", "brittleness")
    queries = ctx.query_examples(payloads)
    n = len(ctx.ids)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= n:
        raise EvaluationError(f"k must be in [1, {n}), got {ks}")
    if seeds < 1 or random_draws < 1:
        raise EvaluationError(f"seeds and random draws must be at least 1, got {seeds} and {random_draws}")
    scores, _ = ctx.scores(queries, measurement, lr_weighting)
    cache = RetrainCache(cache_dir or ctx.directory / "retrains", ctx.task, ctx.ids)
    everything = np.arange(n)
    full = [Job(everything, seed) for seed in range(seeds)]
    # every rank needs the full models' predictions to plan the removals: each trains those still missing
    stats = train_missing(cache, full, workers, task_factory, progress, split=False)
    tested = {seed: np.flatnonzero(correct(ctx, cache.load(full[seed]), queries)) for seed in range(seeds)}

    def removal(positions: np.ndarray, seed: int) -> Job:
        return Job(np.setdiff1d(everything, positions), seed)

    plan: dict[tuple[str, int, int, int, int], Job] = {}  # (method, k, seed, query, draw) -> retrain
    for seed in range(seeds):
        for q in tested[seed]:
            for k in ks:
                for name, s in scores.items():
                    plan[(name, k, seed, int(q), 0)] = removal(top_positions(s[q], ctx.ids, k), seed)
                for draw in range(random_draws):
                    chosen = random_positions(n, k, (random_seed, int(q), k, seed, draw))
                    plan[(RANDOM, k, seed, int(q), draw)] = removal(chosen, seed)
    more = train_missing(cache, list(plan.values()), workers, task_factory, progress)
    if more.rank != 0:
        return None
    flipped = {key: not correct(ctx, cache.load(job), [queries[key[3]]])[0] for key, job in plan.items()}
    pairs = [(seed, int(q)) for seed in range(seeds) for q in tested[seed]]
    results = []
    for name in [*scores, RANDOM]:
        draws = random_draws if name == RANDOM else 1
        row: dict[str, Any] = {"name": name, "flipped": {}, "fraction": {}, "per_pair": {}}
        for k in ks:
            per_pair = [float(np.mean([flipped[(name, k, seed, q, d)] for d in range(draws)])) for seed, q in pairs]
            row["flipped"][str(k)] = int(sum(v for key, v in flipped.items() if key[0] == name and key[1] == k))
            row["fraction"][str(k)] = float(np.mean(per_pair)) if pairs else None
            row["per_pair"][str(k)] = per_pair
        results.append(row)
    methods = [m.describe() for m in ctx.methods]
    retrain = {
        "jobs": stats.jobs + more.jobs,
        "trained": stats.trained + more.trained,
        "seconds": round(stats.seconds + more.seconds, 3),
        "cache": str(cache.directory),
    }
    return {
        "evaluation": "brittleness",
        "config": str(ctx.config.path) if ctx.config is not None else None,
        "queries": len(queries),
        "tested": {str(seed): [int(q) for q in tested[seed]] for seed in range(seeds)},
        "pairs": len(pairs),
        "pair_list": [list(pair) for pair in pairs],  # (seed, query) of each per_pair entry: correct at full data
        "k": ks,
        "seeds": seeds,
        "random_draws": random_draws,
        "measurement": measurement,
        "lr_weighting": lr_weighting,
        "retrain": retrain,
        "methods": methods,
        "results": results,
        "out": str(ctx.output_dir("brittleness", out)),
    }
