"""Validating attribution on a run (``gradstore evaluate``): LDS, brittleness, tail-patch and fact-tracing recall.

Every evaluation compares the run's configured index with re-indexes of the same store under other preconditioners
(:class:`EvaluationContext`). The retraining evaluations (LDS, brittleness) need the optional ``Task.train``;
brittleness also ``Task.correct``. Importable without FastAPI; matplotlib is imported only to draw a plot.
"""

from gradstore.server.errors import EvaluationError

from .attribution import Method, aside_method, parse_preconditioners, score_matrix
from .brittleness import evaluate_brittleness
from .context import EvaluationContext, evaluation_dir
from .lds import evaluate_lds, lds_per_query, load_retrain_results, save_retrain_results, spearman, subset_masks
from .recall import evaluate_recall, load_labels, rank_metrics
from .report import table, write_report
from .retrain import Job, RetrainCache, train_missing
from .tail_patch import evaluate_tail_patch

__all__ = [
    "EvaluationContext",
    "EvaluationError",
    "Job",
    "Method",
    "RetrainCache",
    "aside_method",
    "evaluate_brittleness",
    "evaluate_lds",
    "evaluate_recall",
    "evaluate_tail_patch",
    "evaluation_dir",
    "lds_per_query",
    "load_labels",
    "load_retrain_results",
    "parse_preconditioners",
    "rank_metrics",
    "save_retrain_results",
    "score_matrix",
    "spearman",
    "subset_masks",
    "table",
    "train_missing",
    "write_report",
]
