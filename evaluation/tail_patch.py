"""Tail-patch (TrackStar, Chang et al. 2025): how much one training step on a query's top-``k`` proponents raises
the query's target log-probability, against a step on ``k`` random training examples. No retraining.

From the weights of the run's last checkpoint, one plain SGD step ``theta -= lr * grad mean_i loss_i`` over the
``k`` examples (``lr``: that checkpoint's lr from the run config unless given; the model in eval mode, so dropout
does not add noise), then the query's oriented output (``-loss``: the target log-prob for a token loss; see
:func:`~gradstore.evaluation.outputs.query_outputs`) is compared with its value before the step. Reported
per method and ``k``: the mean change over queries, against the mean over ``random_draws`` random sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradstore.server.errors import EvaluationError

from .brittleness import RANDOM, random_positions, top_positions
from .context import EvaluationContext
from .outputs import model_device, query_outputs, raw_outputs


class Patcher:
    """One model at the final weights; :meth:`delta` applies a step on some examples, measures, and restores."""

    def __init__(self, ctx: EvaluationContext, lr: float, measurement: str):
        name = ctx.engine.checkpoints[-1]
        self.ctx, self.lr, self.measurement = ctx, lr, measurement
        self.model = ctx.task.build_model().to(ctx.engine.device)
        ctx.task.load_checkpoint(self.model, ctx.engine.paths[name])
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]

    def outputs(self, queries: Sequence) -> np.ndarray:
        return query_outputs(self.ctx.task, self.model, queries, self.measurement)

    def delta(self, positions: np.ndarray, query: Any, before: float) -> float:
        """Change of the query's oriented output after one SGD step on the training examples at ``positions``."""
        examples = [self.ctx.examples[int(i)] for i in positions]
        losses = raw_outputs(self.ctx.task, self.model, examples, "loss", batch_size=len(examples))
        grads = torch.autograd.grad(losses.mean(), self.params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.sub_(self.lr * g)
            after = float(self.outputs([query])[0])
            for p, saved in zip(self.params, self.saved):
                p.copy_(saved)
        return after - before


def evaluate_tail_patch(
    ctx: EvaluationContext,
    payloads: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (10, 20, 40),
    lr: float | None = None,
    random_draws: int = 3,
    random_seed: int = 0,
    measurement: str = "loss",
    lr_weighting: str = "schedule",
    out: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean change of each query's target log-prob after a step on its top-``k`` proponents, per method, and on
    ``k`` random examples."""
    queries = ctx.query_examples(payloads)
    n = len(ctx.ids)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise EvaluationError(f"k must be in [1, {n}], got {ks}")
    if random_draws < 1:
        raise EvaluationError(f"random draws must be at least 1, got {random_draws}")
    final = ctx.engine.checkpoints[-1]
    step_lr = float(ctx.engine.index.lrs[final]) if lr is None else float(lr)
    if not step_lr > 0:
        raise EvaluationError(f"the step's lr must be positive, got {step_lr} (give --lr)")
    scores, _ = ctx.scores(queries, measurement, lr_weighting)
    patcher = Patcher(ctx, step_lr, measurement)
    before = patcher.outputs(queries)
    deltas: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in [*scores, RANDOM]}
    for q, query in enumerate(queries):
        for k in ks:
            for name, s in scores.items():
                deltas[name][k].append(patcher.delta(top_positions(s[q], ctx.ids, k), query, before[q]))
            draws = [
                patcher.delta(random_positions(n, k, (random_seed, q, k, d)), query, before[q])
                for d in range(random_draws)
            ]
            deltas[RANDOM][k].append(float(np.mean(draws)))
    results = [
        {
            "name": name,
            "mean_delta": {str(k): float(np.mean(v)) for k, v in per_k.items()},
            "median_delta": {str(k): float(np.median(v)) for k, v in per_k.items()},
            "per_query": {str(k): [float(x) for x in v] for k, v in per_k.items()},
        }
        for name, per_k in deltas.items()
    ]
    return {
        "evaluation": "tail-patch",
        "config": str(ctx.config.path) if ctx.config is not None else None,
        "queries": len(queries),
        "checkpoint": final,
        "lr": step_lr,
        "optimizer": "sgd",
        "device": str(model_device(patcher.model)),
        "k": ks,
        "random_draws": random_draws,
        "measurement": measurement,
        "lr_weighting": lr_weighting,
        "before": [float(v) for v in before],
        "methods": [m.describe() for m in ctx.methods],
        "results": results,
        "out": str(ctx.output_dir("tail-patch", out)),
    }
