"""Training-loop contracts of in-training capture: what is refused, and what a skipped step leaves in the store."""

from __future__ import annotations

import pytest
import torch

from gradstore.logger import CaptureError, GradientLogger, GradientProjector
from gradstore.store import GradientStore

from .models import MLPTask


def _logger(tmp_path, task, model, **kw):
    return GradientLogger(model, task, store=tmp_path / "cap.zarr", rank=4, dtype="float32", chunk_rows=8, progress=False, **kw)


def test_capture_without_backward_is_refused_and_stores_nothing(tmp_path):
    task = MLPTask(n=16)
    model = task.build_model()
    logger = _logger(tmp_path, task, model)
    examples = task.train_examples()
    losses = task.loss(model, task.collate(examples[:8]))
    with pytest.raises(CaptureError, match="ran no backward"):
        with logger.capture(checkpoint="c", lr=0.1, ids=range(8)):
            losses.mean()  # forgot .backward()
    # the logger is still usable, and the refused batch left no rows
    with logger.capture(checkpoint="c", lr=0.1, ids=range(8, 16)):
        task.loss(model, task.collate(examples[8:])).mean().backward()
    logger.close()
    assert sorted(GradientStore.open(tmp_path / "cap.zarr").committed_ids("c").tolist()) == list(range(8, 16))


def test_capture_with_a_changed_lr_is_refused(tmp_path):
    task = MLPTask(n=16)
    model = task.build_model()
    logger = _logger(tmp_path, task, model)
    examples = task.train_examples()
    with logger.capture(checkpoint="c", lr=0.1, ids=range(8)):
        task.loss(model, task.collate(examples[:8])).mean().backward()
    with pytest.raises(CaptureError, match="started with lr=0.1"):
        with logger.capture(checkpoint="c", lr=0.2, ids=range(8, 16)):
            pass
    logger.close()


def test_projector_projects_like_the_logger_without_a_store(tmp_path):
    task = MLPTask(n=8)
    model = task.build_model()
    examples = task.train_examples()
    with GradientProjector(model, task, rank=4, seed=3) as projector:
        alone = projector.project(examples)
    logger = _logger(tmp_path, task, model, seed=3)
    assert logger.spec == projector.spec
    assert torch.equal(logger.project(examples), alone)
    logger.close()
