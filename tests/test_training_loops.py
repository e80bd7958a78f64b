"""Training-loop contracts of in-training capture: what is refused, and what a skipped step leaves in the store."""

from __future__ import annotations

import pytest
import torch

from gradstore.logger import CaptureError, GradientLogger, GradientProjector
from gradstore.store import CheckpointMismatchError, GradientStore

from .helpers.models import MLPTask


def _logger(tmp_path, task, model, **kw):
    return GradientLogger(
        model, task, store=tmp_path / "cap.zarr", rank=4, dtype="float32", chunk_rows=8, progress=False, **kw
    )


def test_capture_without_backward_is_refused_and_stores_nothing(tmp_path):
    task = MLPTask(n=16)
    model = task.build_model()
    logger = _logger(tmp_path, task, model)
    examples = task.train_examples()
    losses = task.loss(model, task.collate(examples[:8]))
    with pytest.raises(CaptureError, match="ran no backward"), logger.capture(checkpoint="c", lr=0.1, ids=range(8)):
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


def test_resume_over_changed_data_with_the_same_ids_is_refused(tmp_path):
    """Default ids are positions: only the content fingerprint can tell that the data changed."""
    task = MLPTask(n=24)
    model = task.build_model()
    examples = task.train_examples()
    logger = _logger(tmp_path, task, model)
    logger.log_checkpoint("c", lr=0.1, examples=examples[:16] + examples[16:], batch_size=8)  # all 3 chunks
    logger.close()
    store = GradientStore.open(tmp_path / "cap.zarr")
    (segment,) = store.segments("c")
    assert all(segment.chunk_fingerprint(k) != 0 for k in range(segment.n_chunks))

    changed = list(examples)
    changed[9] = (changed[9][0] + 1.0, changed[9][1])  # same position (id), other input
    logger = _logger(tmp_path, task, model)
    with pytest.raises(CheckpointMismatchError, match=r"\(chunk 1\): their content changed in rows 8..15"):
        logger.log_checkpoint("c", lr=0.1, examples=changed, batch_size=8)
    assert logger.log_checkpoint("c", lr=0.1, examples=examples, batch_size=8) == 0  # the same data resumes
    logger.close()


def test_grad_scaler_skipped_step_is_recorded_as_skipped_ids(tmp_path):
    """An overflowing step is skipped by the GradScaler.

    Its examples get no row, and the store says they were skipped.
    """
    task = MLPTask(n=16)
    model = task.build_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    logger = _logger(tmp_path, task, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    examples = task.train_examples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step, batch_ids in enumerate(torch.arange(16).split(8)):
        losses = task.loss(model, task.collate([examples[i] for i in batch_ids]))
        if step == 0:
            losses = losses * float("inf")  # an overflow: the scaler skips this step
        optimizer.zero_grad()
        with logger.capture(checkpoint="c", lr=0.1, ids=batch_ids, scaler=scaler):
            scaler.scale(losses.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        if step == 0:
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # really skipped
    assert logger.skipped_ids == {"c": set(range(8))}
    logger.close()
    store = GradientStore.open(tmp_path / "cap.zarr")
    assert store.skipped_ids("c").tolist() == list(range(8))
    assert sorted(store.committed_ids("c").tolist()) == list(range(8, 16))


class LogProbTask(MLPTask):
    """Measurement: the log-probability of the label, where higher means more of the output."""

    higher_is_better = True

    def measurement(self, model, batch):
        return -self.loss(model, batch)


def test_higher_is_better_measurement_keeps_proponents_positive():
    task = LogProbTask(n=8)
    model = task.build_model()
    examples = task.train_examples()
    with GradientProjector(model, task, rank=4) as projector:
        loss_side = projector.project(examples)
        assert torch.equal(projector.project(examples, measurement=True), loss_side)  # grad of -log p = grad of loss
        task.higher_is_better = False  # undeclared: the sign flips and proponents would swap with opponents
        assert torch.equal(projector.project(examples, measurement=True), -loss_side)


def test_examples_of_a_skipped_step_are_indexed_with_zero_rows_at_that_checkpoint(tmp_path):
    """The index holds the union of ids: a skipped step's examples count as zero at its checkpoint, not vanish."""
    from gradstore.store import GradientIndex
    from gradstore.store.manifest import IndexManifest

    task = MLPTask(n=16)
    model = task.build_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    logger = _logger(tmp_path, task, model)
    examples = task.train_examples()
    for checkpoint in ("a", "b"):
        for step, batch_ids in enumerate(torch.arange(16).split(8)):
            losses = task.loss(model, task.collate([examples[i] for i in batch_ids]))
            if checkpoint == "b" and step == 0:
                losses = losses * float("inf")
            with logger.capture(checkpoint=checkpoint, lr=0.1, ids=batch_ids, scaler=scaler):
                scaler.scale(losses.mean()).backward()
            model.zero_grad()
    logger.close()
    store = GradientStore.open(tmp_path / "cap.zarr")
    index = GradientIndex.build(store, progress=False)  # no warning: nothing is absent, 8 rows are skipped
    assert index.ids.tolist() == list(range(16))
    assert IndexManifest.read(index.path).missing_rows == {"b": {"skipped": 8, "absent": 0}}
    contributions = index.self_influence([0.1, 0.1])
    assert (contributions[:8, 1] == 0).all() and (contributions[8:, 1] > 0).all() and (contributions[:, 0] > 0).all()
