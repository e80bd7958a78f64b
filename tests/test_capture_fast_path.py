"""The capture fast paths (#20): LayerNorm x^ from the statistics its autograd node saved, loss scales that stay
tensors (no host synchronisation per step), and projections of fewer than 16 columns zero-padded to 16 on a CPU give
the same rows as the slow paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradstore.logger import GradientLogger, GradientProjector
from gradstore.logger import hooks as hooks_module
from gradstore.logger.layers import LayerNormAdapter
from gradstore.store import GradientStore

from .helpers.models import LMTask, relative_error


def _record_saved(monkeypatch) -> list[bool]:
    """Which NormPart forwards found saved statistics."""
    seen: list[bool] = []
    forward = hooks_module.NormPart.forward

    def recording(self, module, x, m, extra=None):
        feats = forward(self, module, x, m, extra)
        seen.append(feats[2] is not None)
        return feats

    monkeypatch.setattr(hooks_module.NormPart, "forward", recording)
    return seen


def test_layer_norm_statistics_are_taken_from_the_autograd_node():
    ln = nn.LayerNorm(6)
    x = torch.randn(3, 4, 6) * 2 + 1
    out = ln(x)
    mean, rstd = LayerNormAdapter().saved_statistics(ln, x, out)
    expected = nn.functional.layer_norm(x, (6,), eps=ln.eps)
    torch.testing.assert_close(LayerNormAdapter().normalized(ln, x, (mean, rstd)), expected.reshape(3, 4, 6))
    with torch.no_grad():
        assert LayerNormAdapter().saved_statistics(ln, x, ln(x)) is None  # no node: recomputed


@pytest.mark.parametrize("saved", [True, False])
def test_rows_with_and_without_saved_statistics_agree(monkeypatch, saved):
    """The offline pass (exactness-checked against torch.func) and capture() both use the saved statistics; turning
    them off (recomputing x^) gives the same rows to float rounding."""
    task = LMTask(n=12)
    torch.manual_seed(0)
    model = task.build_model()
    seen = _record_saved(monkeypatch)
    if not saved:
        monkeypatch.setattr(LayerNormAdapter, "saved_statistics", lambda self, module, x, output: None)
    projector = GradientProjector(model, task, rank=4)  # the first batch is checked exactly (verify=True)
    rows = projector.project(task.train_examples())
    projector.close()
    assert seen and all(seen) == saved
    torch.manual_seed(0)
    reference = GradientProjector(task.build_model(), task, rank=4)
    monkeypatch.setattr(LayerNormAdapter, "saved_statistics", lambda self, module, x, output: None)
    expected = reference.project(task.train_examples())
    reference.close()
    assert relative_error(rows, expected) < 1e-5


def test_padded_projection_keeps_the_real_columns():
    p_t = torch.randn(32, 5)
    wide = hooks_module.padded(p_t)
    assert wide.shape == (32, 16) and wide.is_contiguous() and not wide[:, 5:].any()
    assert hooks_module.padded(torch.randn(32, 16)).shape == (32, 16)  # 16 columns or more: as it is
    x = torch.randn(2, 7, 32)
    bias = torch.randn(5)
    projected = hooks_module._project(x, wide, 5, hooks_module.padded(bias))
    torch.testing.assert_close(projected, x @ p_t + bias)


def test_rows_with_and_without_padded_projections_agree(monkeypatch):
    """rank 4 (k < 16): the padded products give the rows of the unpadded ones (the offline pass is also
    exactness-checked against torch.func on its first batch)."""
    task = LMTask(n=12)
    rows = {}
    for pad in (True, False):
        if not pad:
            monkeypatch.setattr(hooks_module, "padded", lambda p_t: p_t)
        torch.manual_seed(0)
        projector = GradientProjector(task.build_model(), task, rank=4)
        rows[pad] = projector.project(task.train_examples())
        projector.close()
    assert relative_error(rows[True], rows[False]) < 1e-5


def test_tensor_loss_scale_equals_float_loss_scale(tmp_path):
    """capture(loss_scale=tensor) (the callbacks' device-side normaliser) writes the rows loss_scale=float writes."""
    task = LMTask(n=16)
    stored = {}
    for kind in ("float", "tensor"):
        torch.manual_seed(0)
        model = task.build_model()
        logger = GradientLogger(model, task, store=tmp_path / f"{kind}.zarr", rank=4, dtype="float32", progress=False)
        examples = task.train_examples()
        for start in range(0, len(examples), 4):
            batch = task.collate(examples[start : start + 4])
            losses = task.loss(model, batch)
            n = torch.tensor(float(losses.numel() * 3))  # some normaliser, as a 0-d tensor
            scale = 1.0 / n if kind == "tensor" else 1.0 / float(n)
            with logger.capture("c", 0.1, np.arange(start, start + 4), reduction="sum", loss_scale=scale):
                (losses.sum() / n).backward()
            model.zero_grad()
        logger.close()
        stored[kind] = GradientStore.open(tmp_path / f"{kind}.zarr").read("c")[1]
    np.testing.assert_array_equal(stored["float"], stored["tensor"])
