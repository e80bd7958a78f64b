"""gradstore.logger.hf.GradstoreTrainerCallback: rows logged while a Hugging Face Trainer trains.

Test 1: with learning_rate=0 the weights never move, so every example's row must equal an offline
``log_checkpoint`` at the same weights (1e-5 relative), whatever the Trainer does around it: gradient
accumulation 2, shuffling, padding with an attention mask, remove_unused_columns, both loss normalisations
(num_items_in_batch / per-micro-batch mean), activation checkpointing, dataloader workers, torchrun DDP (2 gloo
ranks); bf16 to bf16 precision. Test 2: training with the callback gives the same losses and weights as without.
Also: a crashed run resumed from its last checkpoint ends with every id exactly once per checkpoint; the GradScaler
path of the shared core (a scaled loss, a skipped step); clear refusals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradstore.logger import CaptureError, GradientLogger, Task  # noqa: E402
from gradstore.logger.callbacks import CaptureSession, Interval, IntervalPlan  # noqa: E402
from gradstore.logger.hf import GradstoreTrainerCallback  # noqa: E402
from gradstore.store import GradientStore  # noqa: E402

from .helpers.hf_run import DOCS, collate, tiny_gpt2  # noqa: E402

RANK = 16

# 22 documents of 3..12 tokens: 6 micro-batches of 4 per epoch (the last of 2), 3 optimizer steps per epoch with
# gradient accumulation 2. With save_steps=2 over 2 epochs the intervals are (0,2] (2,3] (3,4] (4,6]: saves at 2, 4,
# 6 and epoch ends at 3, 6.
INTERVALS = {"checkpoint-2": (0, 2), "checkpoint-3": (2, 3), "checkpoint-4": (3, 4), "checkpoint-6": (4, 6)}


class LMTask(Task):
    """Per-example loss: the document's next-token cross-entropy summed over its (unpadded) tokens."""

    def __init__(self, docs: list[list[int]]):
        self.docs = docs

    def train_examples(self) -> list:
        return [{"input_ids": d} for d in self.docs]

    def collate(self, examples: list) -> dict:
        return collate(examples)

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        )
        return ce.view(labels.shape).sum(1)


def offline_rows(model, tmp: Path) -> dict[int, np.ndarray]:
    """Every example's row from an offline pass at the model's current weights (the reference)."""
    with GradientLogger(
        model, LMTask(DOCS), store=tmp / "ref.zarr", rank=RANK, dtype="float32", progress=False
    ) as logger:
        logger.log_checkpoint("ref", lr=0.0, batch_size=5)
    ids, grads = GradientStore.open(tmp / "ref.zarr").read("ref")
    return {int(i): g for i, g in zip(ids, grads)}


def relative_errors(store: GradientStore, checkpoint: str, reference: dict[int, np.ndarray]) -> np.ndarray:
    ids, grads = store.read(checkpoint)
    ref = np.stack([reference[int(i)] for i in ids])
    return np.linalg.norm(grads - ref, axis=1) / np.linalg.norm(ref, axis=1)


def training_args(out: Path, **overrides) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.0,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def train_dataset():
    """A datasets.Dataset with a column the model does not take (remove_unused_columns drops it)."""
    return datasets.Dataset.from_dict({"input_ids": DOCS, "note": [f"doc {i}" for i in range(len(DOCS))]})


# -- Test 1: the callback's rows equal an offline pass -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["num_items_in_batch", "micro_batch_mean_list", "checkpointing_and_workers"])
def test_rows_equal_an_offline_pass_at_the_same_weights(tmp_path, variant):
    overrides: dict = {}
    if variant == "checkpointing_and_workers":  # ids travel with batches collated in worker processes
        overrides.update(activation_checkpointing=True, dataloader_num_workers=2)
    callback = GradstoreTrainerCallback(store=tmp_path / "run.zarr", rank=RANK, layers=["*"], dtype="float32")
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "out", **overrides),
        # a plain list (no attributes to set; the Trainer's RemoveColumnsCollator drops "note") or a datasets.Dataset
        train_dataset=[{"input_ids": d, "note": "x"} for d in DOCS] if variant.endswith("list") else train_dataset(),
        data_collator=collate,
        callbacks=[callback],
    )
    if variant == "micro_batch_mean_list":  # the model's loss is then its micro-batch token mean / accumulation
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    if variant == "checkpointing_and_workers":
        assert getattr(trainer.model, "is_activation_checkpointing", False)

    store = GradientStore.open(tmp_path / "run.zarr")
    assert store.checkpoints == list(INTERVALS)
    reference = offline_rows(trainer.model, tmp_path)
    for name in store.checkpoints:
        assert relative_errors(store, name, reference).max() < 1e-5, name
    # every example exactly once per epoch, split over that epoch's intervals
    for epoch in (["checkpoint-2", "checkpoint-3"], ["checkpoint-4", "checkpoint-6"]):
        ids = np.concatenate([store.read(name)[0] for name in epoch])
        assert sorted(ids.tolist()) == list(range(len(DOCS)))
    # metadata: the interval's end step, its start weights (Trainer folder or the callback's own copy), lr 0
    for name, (start, end) in INTERVALS.items():
        info = store.checkpoint_info(name)
        assert (info.step, info.lr, info.adam) == (end, 0.0, False)
        folder = f"checkpoint-{start}" if start in (2, 4) else f"gradstore-weights/step-{start}"
        assert info.weights_path == str(tmp_path / "out" / folder / "model.safetensors")
        assert Path(info.weights_path).is_file() and info.weights_sha256
    assert store.checkpoint_info("checkpoint-3").optimizer_path == str(tmp_path / "out/checkpoint-2/optimizer.pt")


def test_bf16_rows_match_to_bf16_precision(tmp_path):
    callback = GradstoreTrainerCallback(store=tmp_path / "run.zarr", rank=RANK, dtype="float32")
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "out", bf16=True, num_train_epochs=1),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    store = GradientStore.open(tmp_path / "run.zarr")
    reference = offline_rows(trainer.model, tmp_path)  # float32
    for name in store.checkpoints:
        ids, grads = store.read(name)
        ref = np.stack([reference[int(i)] for i in ids])
        assert relative_errors(store, name, reference).max() < 2e-2  # bf16 autocast: ~4e-3 measured
        ratio = np.linalg.norm(grads, axis=1) / np.linalg.norm(ref, axis=1)
        assert abs(ratio.mean() - 1) < 5e-3  # no scaling factor was left in (accumulation, normaliser)


# -- Test 2: training is untouched ---------------------------------------------------------------------------------


class RecordLR(TrainerCallback):
    """The learning rate each optimizer step uses."""

    def __init__(self):
        self.rates: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def _train(tmp: Path, with_callback: bool):
    rates = RecordLR()
    callbacks: list = [rates]
    if with_callback:
        callbacks.append(GradstoreTrainerCallback(store=tmp / "run.zarr", rank=RANK, adam_correction=True))
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp / "out", learning_rate=1e-2, warmup_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=callbacks,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.model is not None
    return losses, trainer.model.state_dict(), rates.rates


def test_training_with_the_callback_is_unchanged(tmp_path):
    plain_losses, plain_weights, rates = _train(tmp_path / "plain", with_callback=False)
    with pytest.warns(UserWarning, match="first interval starts with no Adam state"):
        losses, weights, _ = _train(tmp_path / "logged", with_callback=True)
    assert len(losses) == 6 and losses == plain_losses
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)

    store = GradientStore.open(tmp_path / "logged/run.zarr")
    assert rates[0] == 0.0  # warm-up: the first step's lr is 0, so the mean (not the start lr) is recorded
    for name, (start, end) in INTERVALS.items():
        info = store.checkpoint_info(name)
        assert info.lr == pytest.approx(np.mean(rates[start:end]), rel=1e-12)
        assert info.adam == (start > 0)  # Adam state at the interval's start; none before the first step
    assert store.checkpoint_info("checkpoint-3").adam_summary["layers"]  # folded from checkpoint-2/optimizer.pt


# -- resume --------------------------------------------------------------------------------------------------------


def _resume_trainer(tmp: Path, callbacks: list) -> Trainer:
    return Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp / "out"),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=[
            GradstoreTrainerCallback(store=tmp / "run.zarr", rank=RANK, dtype="float32", chunk_rows=4),
            *callbacks,
        ],
    )


class Crash(Exception):
    pass


def test_a_crashed_run_resumed_from_its_checkpoint_logs_every_id_once(tmp_path):
    class CrashAfterStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-4 was saved, inside the interval (4, 6]
                ours.session.flush()  # step 5's rows are committed: the resumed run trains it again and skips them
                raise Crash

    crashed = _resume_trainer(tmp_path, [CrashAfterStep5()])
    ours = next(c for c in crashed.callback_handler.callbacks if isinstance(c, GradstoreTrainerCallback))
    with pytest.raises(Crash):
        crashed.train()  # the callback is abandoned as a killed process would leave it: no close, no flush
    assert GradientStore.open(tmp_path / "run.zarr").num_rows("checkpoint-6") == 8
    trainer = _resume_trainer(tmp_path, [])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-4"))

    store = GradientStore.open(tmp_path / "run.zarr")
    assert store.checkpoints == list(INTERVALS)
    for epoch in (["checkpoint-2", "checkpoint-3"], ["checkpoint-4", "checkpoint-6"]):
        ids = np.concatenate([store.read(name)[0] for name in epoch])
        assert sorted(ids.tolist()) == list(range(len(DOCS)))  # once each: nothing lost, nothing twice
    reference = offline_rows(trainer.model, tmp_path)
    for name in INTERVALS:
        assert relative_errors(store, name, reference).max() < 1e-5, name


# -- torchrun DDP --------------------------------------------------------------------------------------------------


def ddp_worker(out: Path) -> None:
    """One rank of a 2-process gloo run (``python -m torch.distributed.run ... -m tests.test_hf_callback OUT``)."""
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(out / "out", per_device_train_batch_size=2, ddp_backend="gloo", dataloader_drop_last=True),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=[GradstoreTrainerCallback(store=out / "run.zarr", rank=RANK, dtype="float32")],
    )
    trainer.train()


@pytest.mark.slow
def test_torchrun_ddp_ranks_log_their_own_examples(tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ranks = subprocess.Popen(
        [*command, "-m", "tests.test_hf_callback", str(tmp_path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so a hang is ended with the ranks, not just the launcher
    )
    try:
        _, stderr = ranks.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(ranks.pid, signal.SIGKILL)
        raise
    assert ranks.returncode == 0, stderr.decode()[-3000:]
    store = GradientStore.open(tmp_path / "run.zarr")
    assert store.checkpoints == list(INTERVALS)  # 5 batches of 2 per rank and epoch: 3 steps, as on one process
    reference = offline_rows(tiny_gpt2(), tmp_path)
    for name in store.checkpoints:
        assert len(store.segments(name)) == 2  # one capture segment per rank
        assert relative_errors(store, name, reference).max() < 1e-5, name  # num_items_in_batch over both ranks
    for epoch in (["checkpoint-2", "checkpoint-3"], ["checkpoint-4", "checkpoint-6"]):
        ids = np.concatenate([store.read(name)[0] for name in epoch])
        assert len(ids) == len(set(ids.tolist())) == 20  # drop_last: the 11th pair of each epoch is not trained


# -- the shared core -----------------------------------------------------------------------------------------------


def test_interval_plan_cuts_at_saves_epoch_ends_and_the_last_step():
    plan = IntervalPlan((3, 2), max_steps=7)  # 3 steps per epoch, a save every 2
    assert [plan.bounds(s) for s in range(7)] == [(0, 2), (0, 2), (2, 3), (3, 4), (4, 6), (4, 6), (6, 7)]


def test_gradscaler_scale_is_removed_and_a_skipped_step_recorded(tmp_path):
    """The core path the fp16 Trainer takes: the loss's incoming gradient carries the scale and 1/accumulation."""
    model = tiny_gpt2()
    session = CaptureSession(model, tmp_path / "run.zarr", RANK, "gaussian", ["*"], 0, "float32", 1024)
    session.open_interval(Interval("c", 0, 1, 0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = collate([{"input_ids": d} for d in DOCS[:4]])
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    loss = model(**batch).loss  # mean over the batch's tokens
    session.watch(loss, np.arange(4), tokens, scaler)
    scaler.scale(loss / 2).backward()  # accumulation 2
    model.zero_grad()
    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # loss * scale overflows: the step is skipped
    loss = model(**batch).loss
    session.watch(loss, np.arange(4, 8), tokens, overflowing)
    overflowing.scale(loss).backward()
    session.close()

    store = GradientStore.open(tmp_path / "run.zarr")
    reference = offline_rows(model, tmp_path)
    ids, _ = store.read("c")
    assert sorted(ids.tolist()) == [0, 1, 2, 3]
    assert relative_errors(store, "c", reference).max() < 1e-5
    assert sorted(store.skipped_ids("c").tolist()) == [4, 5, 6, 7]


# -- refusals ------------------------------------------------------------------------------------------------------


def test_a_loss_other_than_the_models_is_refused(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "out", label_smoothing_factor=0.1),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=[GradstoreTrainerCallback(store=tmp_path / "run.zarr", rank=RANK)],
    )
    with pytest.raises(CaptureError, match="model's own loss"):
        trainer.train()


def test_an_iterable_dataset_is_refused(tmp_path):
    stream = datasets.Dataset.from_dict({"input_ids": DOCS}).to_iterable_dataset()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "out", max_steps=2),
        train_dataset=stream,
        data_collator=collate,
        callbacks=[GradstoreTrainerCallback(store=tmp_path / "run.zarr", rank=RANK)],
    )
    with pytest.raises(CaptureError, match="iterable dataset"):
        trainer.train()


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
