"""Fact tracing (TrackStar; Akyürek et al. 2022): given the training examples a user marks as relevant to each query,
the mean reciprocal rank (MRR) of the first relevant one in the proponent ranking of every training example, and
recall@k (the fraction of a query's relevant examples among its top ``k``). Ranking: score descending, ties by lower
id first, as the index ranks proponents.

Labels file: JSON Lines, one query per line: ``{"query": <payload>, "relevant": [training example ids]}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradstore.server.errors import EvaluationError

from .context import EvaluationContext


def load_labels(path: Path) -> tuple[list[dict], list[list[int]]]:
    """``(payloads, relevant ids)`` of a labels file."""
    payloads, relevant = [], []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise EvaluationError(f"cannot read labels {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}:{number}: not JSON ({exc})") from None
        ids = entry.get("relevant") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("query"), dict)
            or not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise EvaluationError(
                f'{path}:{number}: each line must be {{"query": <payload object>, "relevant": [example ids, at least '
                "one]}"
            )
        payloads.append(entry["query"])
        relevant.append(sorted(set(ids)))
    if not payloads:
        raise EvaluationError(f"labels {path} hold no queries")
    return payloads, relevant


def ranking(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Training example ids, best proponent first."""
    return ids[np.lexsort((ids, -scores))]


def rank_metrics(
    scores: np.ndarray, ids: np.ndarray, relevant: Sequence[Sequence[int]], ks: Sequence[int]
) -> dict[str, Any]:
    """Per query: rank of the first relevant example and recall@k; their means (MRR, recall@k)."""
    first: list[int] = []
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    for q, marked in enumerate(relevant):
        order = ranking(scores[q], ids)
        hit = np.isin(order, np.asarray(marked, dtype=np.int64))
        first.append(int(np.argmax(hit)) + 1)
        for k in ks:
            recalls[k].append(float(hit[:k].sum()) / len(marked))
    return {
        "mrr": float(np.mean([1.0 / r for r in first])),
        "recall": {str(k): float(np.mean(v)) for k, v in recalls.items()},
        "first_rank": first,
    }


def evaluate_recall(
    ctx: EvaluationContext,
    payloads: Sequence[Mapping[str, Any]],
    relevant: Sequence[Sequence[int]],
    ks: Sequence[int] = (10,),
    measurement: str = "loss",
    lr_weighting: str = "schedule",
    out: Path | None = None,
) -> dict[str, Any]:
    """MRR and recall@k of every method for labelled queries."""
    known = set(ctx.ids.tolist())
    for q, marked in enumerate(relevant):
        unknown = [i for i in marked if i not in known]
        if unknown:
            raise EvaluationError(f"query {q}: relevant ids {unknown[:10]} are not training example ids")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise EvaluationError(f"k must be positive, got {ks}")
    queries = ctx.query_examples(payloads)
    scores, seconds = ctx.scores(queries, measurement, lr_weighting)
    methods = []
    for method in ctx.methods:
        entry = method.describe()
        if method.name in scores:
            entry.update(rank_metrics(scores[method.name], ctx.ids, relevant, ks), score_s=seconds[method.name])
        methods.append(entry)
    return {
        "evaluation": "recall",
        "config": str(ctx.config.path) if ctx.config is not None else None,
        "queries": len(queries),
        "examples": len(ctx.ids),
        "k": ks,
        "measurement": measurement,
        "lr_weighting": lr_weighting,
        "methods": methods,
        "out": str(ctx.output_dir("recall", out)),
    }
