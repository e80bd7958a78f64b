"""gradstore.logger.lightning.GradstoreLightningCallback: rows logged while ``lightning.Trainer`` trains.

Test 1: with a zero learning rate every example's row equals an offline ``log_checkpoint`` at the same weights
(1e-5 relative) under gradient accumulation 2, shuffling and padding, for a per-example mean and a token-mean
loss, with ids read from the sampler or from the batch. Test 2: training with the callback is unchanged. fp16
("16-mixed", a CPU GradScaler) matches to fp16 precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning.pytorch as pl

from gradstore.logger.lightning import GradstoreLightningCallback
from gradstore.store import GradientStore
from tests.test_hf_callback import DOCS, RANK, LMTask, collate, offline_rows, relative_errors, tiny_gpt2

# 6 batches of 4 per epoch, accumulation 2: 3 optimizer steps per epoch; every_n_steps=2 over 2 epochs cuts
# (0,2] (2,3] (3,4] (4,6].
INTERVALS = {"step-2": (0, 2), "step-3": (2, 3), "step-4": (3, 4), "step-6": (4, 6)}


class LitLM(pl.LightningModule):
    def __init__(self, lr: float = 0.0, loss: str = "mean", schedule: bool = False):
        super().__init__()
        self.model, self.task = tiny_gpt2(), LMTask(DOCS)
        self.lr, self.loss_kind, self.schedule = lr, loss, schedule
        self.losses: list[float] = []
        self.rates: list[float] = []

    def training_step(self, batch, batch_idx):
        batch = {k: v for k, v in batch.items() if k != "idx"}
        if self.loss_kind == "token_mean":
            loss = self.model(**batch).loss  # HF's mean over the batch's label tokens
        else:
            loss = self.task.loss(self.model, batch).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.schedule:
            return optimizer
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def _fit(tmp, module: LitLM, callback: GradstoreLightningCallback | None, loader: Any = None, **trainer_args) -> Any:
    torch.manual_seed(1)  # the shuffle order
    examples: Any = [{"input_ids": d} for d in DOCS]
    loader = loader or torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True, collate_fn=collate)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[callback] if callback is not None else [],
        **trainer_args,
    )
    trainer.fit(module, loader)
    return trainer


def _check_rows(tmp, module: LitLM, tolerance: float = 1e-5) -> GradientStore:
    store = GradientStore.open(tmp / "run.zarr")
    assert store.checkpoints == list(INTERVALS)
    reference = offline_rows(module.model, tmp)
    for name in store.checkpoints:
        assert relative_errors(store, name, reference).max() < tolerance, name
    for epoch in (["step-2", "step-3"], ["step-4", "step-6"]):
        ids = np.concatenate([store.read(name)[0] for name in epoch])
        assert sorted(ids.tolist()) == list(range(len(DOCS)))
    return store


# -- Test 1 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mean", "token_mean"])
def test_rows_equal_an_offline_pass_at_the_same_weights(tmp_path, loss):
    reduction = (lambda batch: (batch["labels"][:, 1:] != -100).sum()) if loss == "token_mean" else "mean"
    callback = GradstoreLightningCallback(
        store=tmp_path / "run.zarr", rank=RANK, module="model", dtype="float32", reduction=reduction, every_n_steps=2
    )
    module = LitLM(loss=loss)
    _fit(tmp_path, module, callback)
    store = _check_rows(tmp_path, module)
    for name, (start, end) in INTERVALS.items():
        info = store.checkpoint_info(name)
        assert (info.step, info.lr) == (end, 0.0)
        assert info.weights_path == str(tmp_path / f"gradstore-weights/step-{start}/model.safetensors")


def test_ids_can_come_from_the_batch(tmp_path):
    examples: Any = [{"idx": i, "input_ids": d} for i, d in enumerate(DOCS)]

    def collate_with_ids(features):
        return {**collate(features), "idx": torch.tensor([f["idx"] for f in features])}

    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True, collate_fn=collate_with_ids)
    callback = GradstoreLightningCallback(
        store=tmp_path / "run.zarr", rank=RANK, module="model", dtype="float32", ids="idx", every_n_steps=2
    )
    module = LitLM()
    _fit(tmp_path, module, callback, loader=loader)
    _check_rows(tmp_path, module)


def test_fp16_gradscaler_rows_match_to_fp16_precision(tmp_path):
    """fp16 autocast with a GradScaler (Lightning picks bf16 on CPU by itself, so the plugin is given)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    callback = GradstoreLightningCallback(
        store=tmp_path / "run.zarr", rank=RANK, module="model", dtype="float32", every_n_steps=2
    )
    module = LitLM()
    trainer = _fit(tmp_path, module, callback, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler is scaler and scaler.get_scale() >= 2.0**12  # no step was skipped
    store = _check_rows(tmp_path, module, tolerance=5e-3)  # fp16 autocast: 4e-4 measured
    reference = offline_rows(module.model, tmp_path)
    for name in store.checkpoints:
        ids, grads = store.read(name)
        ratio = np.linalg.norm(grads, axis=1) / np.linalg.norm(np.stack([reference[int(i)] for i in ids]), axis=1)
        assert abs(ratio.mean() - 1) < 5e-3  # the scale and 1/accumulation were removed


# -- Test 2 --------------------------------------------------------------------------------------------------------


def test_training_with_the_callback_is_unchanged(tmp_path):
    plain = LitLM(lr=1e-2, schedule=True)
    _fit(tmp_path / "plain", plain, None)
    logged = LitLM(lr=1e-2, schedule=True)
    callback = GradstoreLightningCallback(
        store=tmp_path / "run.zarr", rank=RANK, module="model", every_n_steps=2, adam_correction=True
    )
    with pytest.warns(UserWarning, match="no Adam state at step 0"):
        _fit(tmp_path, logged, callback)
    assert len(logged.losses) == 12 and logged.losses == plain.losses
    weights, plain_weights = logged.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)

    store = GradientStore.open(tmp_path / "run.zarr")
    per_step = plain.rates[::2]  # the lr of each optimizer step (two micro-batches each)
    for name, (start, end) in INTERVALS.items():
        info = store.checkpoint_info(name)
        assert info.lr == pytest.approx(np.mean(per_step[start:end]), rel=1e-12)
        assert info.adam == (start > 0)
