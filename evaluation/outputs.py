"""A query's output on a model, oriented so that larger means more of the output (what attribution predicts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradstore.logger import Task, TaskError
from gradstore.logger.task import move_to_device
from gradstore.server.errors import EvaluationError


def model_device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def raw_outputs(
    task: Task, model: torch.nn.Module, examples: Sequence, measurement: str = "loss", batch_size: int = 64
) -> torch.Tensor:
    """``[Q]`` values of ``Task.loss`` (``measurement="loss"``) or ``Task.measurement`` of each example, as a
    tensor (differentiable unless the caller runs it under ``no_grad``)."""
    if measurement not in ("loss", "measurement"):
        raise EvaluationError(f"measurement must be 'loss' or 'measurement', got {measurement!r}")
    fn = task.loss if measurement == "loss" else task.measurement
    device = model_device(model)
    parts = []
    for lo in range(0, len(examples), batch_size):
        chunk = list(examples[lo : lo + batch_size])
        values = fn(model, move_to_device(task.collate(chunk), device))
        if values.shape != (len(chunk),):
            raise TaskError(
                f"{type(task).__name__}.{fn.__name__} must return one value per example, shape [{len(chunk)}], "
                f"got {list(values.shape)}"
            )
        parts.append(values)
    return torch.cat(parts)


def orientation(task: Task, measurement: str) -> float:
    """+1 when a larger raw value means more of the output (a ``measurement`` with ``Task.higher_is_better``),
    else -1 (the loss; a measurement where lower means more, as the query gradient takes it)."""
    return 1.0 if measurement == "measurement" and task.higher_is_better else -1.0


def query_outputs(
    task: Task, model: torch.nn.Module, examples: Sequence, measurement: str = "loss", batch_size: int = 64
) -> np.ndarray:
    """``[Q]`` float64 oriented outputs: ``-loss`` (for a loss, the target log-prob), or the measurement with the
    sign that makes larger mean more of the output. Attribution scores predict an increase of this value."""
    with torch.no_grad():
        values = raw_outputs(task, model, examples, measurement, batch_size)
    return orientation(task, measurement) * values.detach().cpu().double().numpy()
