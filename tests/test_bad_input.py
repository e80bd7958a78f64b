"""Bad input gets a clear, typed error, and a failed write leaves the store serving what it had.

Every store here starts as a copy of one base store: the tiny MLP task's 64 examples logged as
checkpoint "c0" (float32, chunk_rows=8, rank 4). After each write-side error the store is reopened
from disk and must serve exactly the base rows of "c0".
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.logger import GradientLogger, NonFiniteGradientError, TaskError, UnknownLayerError
from gradstore.projection import GradstoreError, ProjectionMismatchError
from gradstore.store import (
    CheckpointInfo,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DuplicateIdError,
    GradientStore,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownExampleError,
)

from .helpers.crash_task import MLPTask, make_model

N, CHUNK = 64, 8
OPTIONS = dict(rank=4, chunk_rows=CHUNK, dtype="float32", progress=False)


def make_logger(path: Path, task=None, **overrides) -> GradientLogger:
    return GradientLogger(
        make_model(), task if task is not None else MLPTask(N), store=path, **{**OPTIONS, **overrides}
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.zarr"
    with make_logger(path) as logger:
        assert logger.log_checkpoint("c0", lr=0.1, batch_size=8) == N
    ids, grads = GradientStore.open(path).read("c0")
    np.testing.assert_array_equal(ids, np.arange(N))
    assert grads.shape == (N, 28) and np.isfinite(grads).all() and (np.abs(grads).sum(axis=1) > 0).all()
    return path, ids, grads


@pytest.fixture
def store_path(base, tmp_path) -> Path:
    path = tmp_path / "run.zarr"
    shutil.copytree(base[0], path)
    return path


def assert_intact(path: Path, base, checkpoints=("c0",)) -> GradientStore:
    """The store reopens read-only and serves the base rows of "c0" unchanged."""
    _, ref_ids, ref_grads = base
    store = GradientStore.open(path)
    assert set(checkpoints) <= set(store.checkpoints)
    ids, grads = store.read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(grads, ref_grads)
    (segment,) = store.segments("c0")
    np.testing.assert_array_equal(segment.committed_counts(), [CHUNK] * (N // CHUNK))
    return store


# -- tasks that break their contract -----------------------------------------------------------


class DuplicateIdTask(MLPTask):
    def example_id(self, example, index):
        return index // 2  # 0, 0, 1, 1, ...


class ScalarLossTask(MLPTask):
    def loss(self, model, batch):
        return super().loss(model, batch).mean()  # forgot reduction='none'


class ColumnLossTask(MLPTask):
    def loss(self, model, batch):
        return super().loss(model, batch)[:, None]  # [B, 1]


class ScaledLossTask(MLPTask):
    """Multiplies the loss of the examples in ``scales`` (by id); NaN makes their gradients NaN."""

    def __init__(self, scales: dict[int, float]):
        super().__init__(N)
        self.scales = scales

    def loss(self, model, batch):
        losses = super().loss(model, batch)
        factor = torch.tensor([self.scales.get(int(i), 1.0) for i in batch[2]])
        return losses * factor


# -- ids -----------------------------------------------------------------------------------------


def test_duplicate_example_ids(store_path, base):
    with make_logger(store_path, DuplicateIdTask(N)) as logger:
        with pytest.raises(DuplicateIdError, match=r"Task.example_id gives the same id to several examples") as info:
            logger.log_checkpoint("dup", lr=0.1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GradstoreError)
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in str(info.value)  # the first ten repeated ids
    store = assert_intact(store_path, base)
    assert "dup" not in store.checkpoints  # refused before anything was written


def test_duplicate_ids_in_capture(store_path, base):
    task = MLPTask(N)
    with make_logger(store_path, task) as logger:
        model = logger.model
        batch = task.collate(task.examples[:3])
        with pytest.raises(DuplicateIdError, match="logged twice"):
            with logger.capture("cap", lr=0.1, ids=[4, 4, 5]):
                task.loss(model, batch).mean().backward()
        with logger.capture("cap", lr=0.1, ids=[0, 1, 2]):
            task.loss(model, batch).mean().backward()
        with pytest.raises(DuplicateIdError, match=r"logged twice for checkpoint 'cap': \[1\]"):
            with logger.capture("cap", lr=0.1, ids=[1, 3, 6]):
                task.loss(model, batch).mean().backward()
    store = assert_intact(store_path, base)
    ids, grads = store.read("cap")
    np.testing.assert_array_equal(ids, [0, 1, 2])  # only the good step was logged
    np.testing.assert_allclose(grads, base[2][:3], rtol=1e-5, atol=1e-7)


# -- reopening with other settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change", [{"rank": 3}, {"rank": (4, 2)}, {"seed": 1}, {"init": "rademacher"}, {"layers": ["0"]}], ids=str
)
def test_reopen_with_different_projection(store_path, base, change):
    with pytest.raises(ProjectionMismatchError, match="was written with a different projection") as info:
        make_logger(store_path, **change)
    assert isinstance(info.value, ValueError)
    assert "use the same rank/init/seed/layers or a new store path" in str(info.value)
    assert_intact(store_path, base)


def test_reopen_with_same_projection_is_accepted(store_path, base):
    with make_logger(store_path) as logger:  # the control: identical settings reopen fine and resume nothing
        assert logger.log_checkpoint("c0", lr=0.1, batch_size=8) == 0
    assert_intact(store_path, base)


def test_unknown_layer_pattern_lists_available_layers(tmp_path):
    path = tmp_path / "new.zarr"
    expected = r"layer patterns \['encoder\.\*'\] match no trainable block \(supported modules"
    with pytest.raises(UnknownLayerError, match=expected) as info:
        make_logger(path, layers=["0", "encoder.*"])
    assert isinstance(info.value, ValueError)
    assert "available: 0, 2" in str(info.value)  # the model's Linear layers, by module name
    assert not path.exists()  # nothing was created


def test_reopen_with_different_dtype(store_path, base):
    with pytest.raises(StoreFormatError, match="holds float32 gradients, not float16"):
        make_logger(store_path, dtype="float16")
    spec = GradientStore.open(store_path).spec
    with pytest.raises(StoreFormatError, match="holds float32 gradients, not float16"):
        GradientStore.open_or_create(store_path, spec, dtype="float16")
    assert_intact(store_path, base)


def test_unsupported_format_version(store_path):
    meta_file = store_path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["gradstore"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="store format version 99 is not supported"):
        GradientStore.open(store_path)


# -- a Task that breaks its contract ------------------------------------------------------------


@pytest.mark.parametrize(("task_cls", "shape"), [(ScalarLossTask, "()"), (ColumnLossTask, "(8, 1)")])
def test_wrong_loss_shape(store_path, base, task_cls, shape):
    with (
        make_logger(store_path, task_cls(N)) as logger,
        pytest.raises(TaskError, match=r"must return one value per example, shape \(8,\); got " + re.escape(shape)),
    ):
        logger.log_checkpoint("bad", lr=0.1, batch_size=8)
    store = assert_intact(store_path, base)
    assert store.read("bad")[0].size == 0  # begun, nothing committed


def test_nan_loss_reports_exactly_the_bad_ids(store_path, base):
    bad = [19, 21]  # both in the third batch of 8; chunks 0 and 1 are complete before it
    with (
        make_logger(store_path, ScaledLossTask({i: float("nan") for i in bad})) as logger,
        pytest.raises(
            NonFiniteGradientError, match=r"non-finite \(NaN/Inf\) gradients for example ids \[19, 21\]"
        ) as info,
    ):
        logger.log_checkpoint("nan", lr=0.1, batch_size=8)
    assert info.value.ids == bad
    assert isinstance(info.value, FloatingPointError)
    store = assert_intact(store_path, base)
    # the rows finished before the bad batch were committed and are correct; no NaN row is served
    ids, grads = store.read("nan")
    np.testing.assert_array_equal(ids, np.arange(16))
    np.testing.assert_array_equal(grads, base[2][:16])
    # fixing the task and resuming computes only the rest, and completes the checkpoint
    with make_logger(store_path) as logger:
        assert logger.log_checkpoint("nan", lr=0.1, batch_size=8) == N - 16
    ids, grads = GradientStore.open(store_path).read("nan")
    np.testing.assert_array_equal(ids, base[1])
    np.testing.assert_array_equal(grads, base[2])


def test_float16_overflow_says_use_float32(tmp_path):
    path = tmp_path / "half.zarr"
    with make_logger(path, dtype="float16") as logger:
        assert logger.log_checkpoint("c0", lr=0.1, batch_size=8) == N
    before_ids, before = GradientStore.open(path).read("c0")
    assert before.dtype == np.float16

    huge = [10, 13]  # second batch; gradients ~1e8, finite in float32 but > 65504
    with make_logger(path, ScaledLossTask({i: 1e8 for i in huge}), dtype="float16") as logger:
        full = logger.project([logger.task.examples[i] for i in huge])
        assert torch.isfinite(full).all() and full.abs().max() > 65504
        with pytest.raises(
            NonFiniteGradientError, match=r"overflow float16; create the store with dtype='float32'"
        ) as info:
            logger.log_checkpoint("big", lr=0.1, batch_size=8)
    assert info.value.ids == huge
    store = GradientStore.open(path)
    ids, grads = store.read("c0")
    np.testing.assert_array_equal(ids, before_ids)
    np.testing.assert_array_equal(grads, before)
    ids, grads = store.read("big")
    np.testing.assert_array_equal(ids, np.arange(8))  # the first batch only
    np.testing.assert_array_equal(grads, before[:8])
    assert np.isfinite(grads).all()


# -- resuming a checkpoint with other arguments --------------------------------------------------


def test_resume_with_different_lr(store_path, base):
    with (
        make_logger(store_path) as logger,
        pytest.raises(CheckpointMismatchError, match=r"checkpoint 'c0' already exists with different metadata") as info,
    ):
        logger.log_checkpoint("c0", lr=0.2)
    assert "'lr': (0.1, 0.2)" in str(info.value)
    assert GradientStore.open(store_path).checkpoint_info("c0").lr == 0.1
    assert_intact(store_path, base)


def test_resume_with_different_number_of_examples(store_path, base):
    task = MLPTask(N)
    with make_logger(store_path, task) as logger:
        with pytest.raises(CheckpointMismatchError, match=r"was started over 64 examples, now given 40"):
            logger.log_checkpoint("c0", lr=0.1, examples=task.examples[:40])
    assert_intact(store_path, base)


def test_resume_with_reordered_examples(store_path, base):
    task = MLPTask(N)
    with (
        make_logger(store_path, task) as logger,
        pytest.raises(
            CheckpointMismatchError, match=r"the examples differ from those of the interrupted run \(chunk 0\)"
        ),
    ):
        logger.log_checkpoint("c0", lr=0.1, examples=task.examples[::-1])
    assert_intact(store_path, base)


# -- reading ----------------------------------------------------------------------------------------


def test_read_unknown_checkpoint(store_path):
    store = GradientStore.open(store_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        store.read("c9")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("checkpoint 'c9' is not in store")
    assert str(info.value).endswith("it has ['c0']")
    with pytest.raises(KeyError):
        store.checkpoint_info("c9")


def test_open_missing_store(tmp_path):
    path = tmp_path / "nowhere.zarr"
    with pytest.raises(StoreNotFoundError, match="no gradient store at") as info:
        GradientStore.open(path)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        GradientStore.open(path, mode="a")
    assert not path.exists()


def test_read_unknown_example_ids(store_path, base):
    store = GradientStore.open(store_path)
    with pytest.raises(UnknownExampleError, match=r"checkpoint 'c0' has no committed row for ids \[12345\]") as info:
        store.read("c0", ids=[3, 12345])
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownExampleError, match=r"\[64, 65, .*\] \(and 2 more\)"):
        store.read("c0", ids=list(range(60, 76)))
    ids, grads = store.read("c0", ids=[7, 3])  # the control: known ids come back in the order asked
    np.testing.assert_array_equal(ids, [7, 3])
    np.testing.assert_array_equal(grads, base[2][[7, 3]])


# -- writing where one must not -------------------------------------------------------------------


def test_write_to_read_only_store(store_path, base):
    store = GradientStore.open(store_path)  # mode "r" by default
    assert store.read_only
    with pytest.raises(
        StoreReadOnlyError, match=r"is open read-only; use GradientStore.open\(path, mode='a'\)"
    ) as info:
        store.begin_checkpoint(CheckpointInfo(name="x", lr=0.1))
    assert isinstance(info.value, PermissionError)
    with pytest.raises(StoreReadOnlyError):
        store.new_capture_segment("c0")
    with pytest.raises(StoreReadOnlyError):
        store.pass_segment("c0", N)
    assert "x" not in store.checkpoints
    assert_intact(store_path, base)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 129])
def test_bad_checkpoint_name(store_path, base, name):
    task = MLPTask(N)
    with make_logger(store_path, task) as logger:
        with pytest.raises(ValueError, match="must be 1-128 characters of letters, digits"):
            logger.log_checkpoint(name, lr=0.1)
        with pytest.raises(ValueError, match="must be 1-128 characters of letters, digits"):
            with logger.capture(name, lr=0.1, ids=[0]):
                pass
    with pytest.raises(ValueError, match="must be 1-128 characters"):
        CheckpointInfo(name=name, lr=0.1)
    assert not (store_path.parent / "x").exists()  # nothing escaped the store
    store = assert_intact(store_path, base)
    assert store.checkpoints == ["c0"]
