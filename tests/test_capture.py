"""In-training capture, AMP and activation checkpointing against the checkpoint pass / fp32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradstore.logger import GradientLogger
from gradstore.store import GradientStore

from .helpers.models import LMTask, MLPTask, TinyCausalLM, relative_error


def _pass_rows(tmp_path, task, model, name="pass.zarr", **kw):
    logger = GradientLogger(
        model, task, store=tmp_path / name, rank=6, dtype="float32", chunk_rows=8, progress=False, **kw
    )
    logger.log_checkpoint("c", lr=0.1, batch_size=16)
    logger.close()
    return GradientStore.open(tmp_path / name).read("c")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_capture_in_training_loop_equals_checkpoint_pass(tmp_path, reduction):
    task = MLPTask(n=60)
    torch.manual_seed(0)
    model = task.build_model()
    ids_ref, rows_ref = _pass_rows(tmp_path, task, model)

    logger = GradientLogger(
        model, task, store=tmp_path / "cap.zarr", rank=6, dtype="float32", chunk_rows=8, progress=False
    )
    examples = task.train_examples()
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1))
    for batch_ids in order.split(7):  # shuffled batches; 7 does not divide the chunk size
        losses = task.loss(model, task.collate([examples[i] for i in batch_ids]))
        loss = losses.mean() if reduction == "mean" else losses.sum()
        with logger.capture(checkpoint="c", lr=0.1, ids=batch_ids, reduction=reduction):
            loss.backward()
        model.zero_grad()  # no optimizer step: the weights stay those of the pass
    logger.close()
    ids, rows = GradientStore.open(tmp_path / "cap.zarr").read("c", ids=ids_ref)
    assert relative_error(torch.from_numpy(rows), torch.from_numpy(rows_ref)) < 1e-5


def test_capture_removes_grad_scaler_scale(tmp_path):
    task = MLPTask(n=24)
    torch.manual_seed(0)
    model = task.build_model()
    ids_ref, rows_ref = _pass_rows(tmp_path, task, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    logger = GradientLogger(
        model, task, store=tmp_path / "cap.zarr", rank=6, dtype="float32", chunk_rows=8, progress=False
    )
    examples = task.train_examples()
    for batch_ids in torch.arange(len(examples)).split(8):
        losses = task.loss(model, task.collate([examples[i] for i in batch_ids]))
        with logger.capture(checkpoint="c", lr=0.1, ids=batch_ids, scaler=scaler):
            scaler.scale(losses.mean()).backward()
        model.zero_grad()
    logger.close()
    _, rows = GradientStore.open(tmp_path / "cap.zarr").read("c", ids=ids_ref)
    assert relative_error(torch.from_numpy(rows), torch.from_numpy(rows_ref)) < 1e-5


def test_capture_resume_skips_committed_ids(tmp_path):
    task = MLPTask(n=40)
    torch.manual_seed(0)
    model = task.build_model()
    examples = task.train_examples()

    def run(id_batches):
        logger = GradientLogger(model, task, store=tmp_path / "cap.zarr", rank=4, chunk_rows=8, progress=False)
        for batch_ids in id_batches:
            losses = task.loss(model, task.collate([examples[i] for i in batch_ids]))
            with logger.capture(checkpoint="c", lr=0.1, ids=batch_ids):
                losses.mean().backward()
        logger.close()

    ids = torch.arange(40)
    run(ids[:24].split(8))  # an interrupted epoch
    run(ids.split(8))  # the restarted epoch replays every batch
    stored, _ = GradientStore.open(tmp_path / "cap.zarr").read("c")
    assert sorted(stored.tolist()) == list(range(40))


class _AmpTask(LMTask):
    def __init__(self, dtype, **kw):
        super().__init__(**kw)
        self.amp_dtype = dtype

    def loss(self, model, batch):
        with torch.autocast("cpu", dtype=self.amp_dtype):
            return super().loss(model, batch).float()


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_fp32_reference(amp_dtype):
    """Autocast runs the layers in 16 bits; projections accumulate in fp32.

    Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op, compounding through
    a few layers), fp16 keeps 11; we require Pearson > 0.999 and max error < 5% of the largest entry.
    """
    task = LMTask(n=16)
    torch.manual_seed(0)
    model = task.build_model()
    with GradientLogger(model, task, rank=8, progress=False) as logger:
        reference = logger.project(task.train_examples())
    with GradientLogger(model, _AmpTask(amp_dtype, n=16), rank=8, progress=False) as logger:
        amp = logger.project(task.train_examples())
    assert amp.dtype == torch.float32
    pearson = float(np.corrcoef(amp.flatten().numpy(), reference.flatten().numpy())[0, 1])
    assert pearson > 0.999
    assert relative_error(amp, reference) < 0.05


class _CheckpointedLM(TinyCausalLM):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant

    def block(self, h):
        # the transformer block is recomputed during backward
        return checkpoint(super().block, h, use_reentrant=self.reentrant)


class _CheckpointedTask(LMTask):
    def __init__(self, reentrant: bool, **kw):
        super().__init__(**kw)
        self.reentrant = reentrant

    def build_model(self):
        return _CheckpointedLM(self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_does_not_double_count(reentrant):
    task = LMTask(n=12)
    torch.manual_seed(0)
    model = task.build_model()
    checkpointed_task = _CheckpointedTask(reentrant, n=12)
    checkpointed = checkpointed_task.build_model()
    checkpointed.load_state_dict(model.state_dict())
    reference = GradientLogger(model, task, rank=8, progress=False).project(task.train_examples())
    got = GradientLogger(checkpointed, checkpointed_task, rank=8, progress=False).project(task.train_examples())
    assert relative_error(got, reference) < 1e-5


def test_capture_with_activation_checkpointing_in_training(tmp_path):
    """Non-reentrant checkpointing in a real training backward: the recomputed forward is not counted."""
    task = MLPTask(n=16)
    torch.manual_seed(0)
    model = task.build_model()
    ids_ref, rows_ref = _pass_rows(tmp_path, task, model)

    class CheckpointedSequential(nn.Sequential):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=False)

    wrapped = CheckpointedSequential(*model)  # same module names, same weights
    logger = GradientLogger(
        wrapped, task, store=tmp_path / "cap.zarr", rank=6, dtype="float32", chunk_rows=8, progress=False
    )
    examples = task.train_examples()
    batch_ids = torch.arange(16)
    losses = task.loss(wrapped, task.collate(examples))
    with logger.capture(checkpoint="c", lr=0.1, ids=batch_ids, reduction="sum"):
        losses.sum().backward()
    logger.close()
    _, rows = GradientStore.open(tmp_path / "cap.zarr").read("c", ids=ids_ref)
    assert relative_error(torch.from_numpy(rows), torch.from_numpy(rows_ref)) < 1e-5
