"""A text run with many checkpoints (a real run's shape) for the dashboard's browser tests.

The tiny word-level LM of :mod:`tests.helpers.text_run`, trained a few SGD steps per stretch under a cosine
learning-rate schedule, with an offline pass logged after each of ``n`` stretches (32 by default: ~10 s on 2 cores).
Its engine's Task has no ``describe_positions``, so per-token explanations come back without position labels.
"""

from __future__ import annotations

import math
from pathlib import Path

from gradstore.server.run.engine import QueryEngine

from .text_run import TextRun, TextTask, build_text_run


class UnlabelledTextTask(TextTask):
    """:class:`TextTask` without position labels (``describe_positions`` returns None, the protocol's default)."""

    def describe_positions(self, example):
        return None


def cosine_lrs(n: int, peak: float = 0.03, floor: float = 0.002) -> tuple[float, ...]:
    """A cosine decay from ``peak + floor`` to about ``floor`` over ``n`` checkpoints."""
    return tuple(floor + peak * 0.5 * (1 + math.cos(math.pi * c / n)) for c in range(n))


def build_many_checkpoint_run(directory: Path, n: int = 32, steps: int = 4) -> tuple[TextRun, QueryEngine]:
    """The run (``n`` checkpoints ``ckpt-0`` .. ``ckpt-<n-1>``) and an engine over it whose Task has no position
    labels."""
    run = build_text_run(directory, steps=(steps,) * n, lrs=cosine_lrs(n))
    engine = QueryEngine(UnlabelledTextTask(), run.store, run.index, run.weights, device="cpu")
    return run, engine
