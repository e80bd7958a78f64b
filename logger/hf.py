"""Hugging Face ``Trainer`` integration: log every training example's projected gradient while training.

``Trainer(..., callbacks=[GradstoreTrainerCallback(store="runs/x.zarr", rank=16, layers=["*"])])``. Each interval
between the Trainer's saves (and epoch ends) is one gradstore checkpoint, named after the checkpoint folder it ends in
(``checkpoint-500``); see :mod:`gradstore.logger.callbacks` for what it records (weights and optimizer state at the
interval's start, mean lr, end step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from gradstore.projection.spec import Init
from gradstore.store.gradient_store import StoreDtype

from .callbacks import (
    IDS_KEY,
    CaptureSession,
    Interval,
    IntervalPlan,
    TaggedLoader,
    barrier,
    interval_lr,
    tag_dataloader,
    weights_at,
)
from .errors import CaptureError
from .hf_task import CausalLMTask
from .projector import Rank

__all__ = ["CausalLMTask", "GradstoreTrainerCallback"]

LossNormalizer = Callable[[Mapping[str, Any]], "float | torch.Tensor"]


class GradstoreTrainerCallback(TrainerCallback):
    """Logs each training example's projected gradient, at the weights of its step, as the Trainer trains.

    Args:
        store: path of the Zarr store (created if absent; a resumed run appends to it).
        rank, init, layers, seed, dtype, chunk_rows: as for :class:`~gradstore.logger.GradientLogger`.
        adam_correction: fold each interval's Adam second moment (from the optimizer state at its start) into
            its projection (TrackStar). The first interval starts from an empty state and is logged without it.
        loss_normalizer: ``fn(forward kwargs) -> N`` such that the model's loss is ``sum_i loss_i / N`` over the
            micro-batch (``loss_i`` summed over example i's tokens). Default: ``num_items_in_batch`` when the
            Trainer passes it, else the micro-batch's label tokens that are not -100 (shifted for causal LMs), or
            the number of examples for one label per example.
        weights_dir: where weights the Trainer does not save itself (the initial ones, epoch ends that are not
            saves) are saved (default ``{output_dir}/gradstore-weights``).

    Example ids are dataset indices (positions in ``train_dataset``), whatever the sampler does: the train
    dataloader's dataset hands each batch's indices to its collate function, which puts them into the batch, and a
    hook on the model removes them before its forward. So they survive shuffling, dataloader workers, the batches
    a resumed run skips, and torchrun DDP (each rank logs its own share into its own store segment).

    Per-example scaling: a hook on ``outputs.loss`` reads the gradient arriving at it when the backward starts,
    which is every factor the Trainer applied after the model (``1/accumulation``, a GradScaler's scale, the
    world-size factor of ``average_tokens_across_devices``); with the loss's normaliser ``N`` (see
    ``loss_normalizer``) that gives each example's gradient of its own summed loss. So the model's own loss must
    be what is back-propagated: label smoothing or a ``compute_loss_func`` (no ``outputs.loss``) are refused, and a
    training forward whose loss is never back-propagated is an error; an overridden ``compute_loss`` that adds
    terms to ``outputs.loss`` is not detected and makes rows inexact.

    Resuming (``resume_from_checkpoint``): rows are committed before every save the Trainer makes (at the
    interval's end, and whenever ``should_save``/``should_evaluate`` is set), so the resumed run loses none, and
    rows already committed are skipped when their examples are trained again.
    """

    def __init__(
        self,
        store: str | Path,
        rank: Rank = 8,
        layers: Sequence[str] = ("*",),
        init: Init = "gaussian",
        seed: int = 0,
        dtype: StoreDtype = "float16",
        chunk_rows: int | None = None,
        adam_correction: bool = False,
        loss_normalizer: LossNormalizer | None = None,
        weights_dir: str | Path | None = None,
    ):
        self.store, self.rank, self.layers, self.init, self.seed = store, rank, list(layers), init, seed
        self.dtype, self.chunk_rows, self.adam_correction = dtype, chunk_rows, adam_correction
        self.loss_normalizer, self.weights_dir = loss_normalizer, weights_dir
        self.session: CaptureSession | None = None
        self._tagged: TaggedLoader | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: tuple[np.ndarray, float | torch.Tensor] | None = None
        self._labels: torch.Tensor | None = None  # the pending forward's labels (for the first exactness check)
        self._forwards = 0
        self._warned: set[str] = set()

    # -- setup -----------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model: nn.Module = kwargs["model"]
        loader = kwargs.get("train_dataloader")
        if loader is None:
            raise CaptureError("GradstoreTrainerCallback needs the Trainer's train dataloader (transformers >= 4.46)")
        self.close()
        self._tagged = tag_dataloader(loader)  # first: refuses an iterable dataset
        try:
            self._setup(args, state, model, loader, kwargs)
        except BaseException:
            self.close()
            raise

    def _setup(self, args: TrainingArguments, state: TrainerState, model: nn.Module, loader: Any, kwargs: dict):
        self._model, self._optimizer, self._scheduler = model, kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        self._scaler = getattr(self._optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds fp16's
        self._output = Path(args.output_dir or "trainer_output")
        self._own = Path(self.weights_dir) if self.weights_dir is not None else self._output / "gradstore-weights"
        self._writer = state.is_world_process_zero
        batches, accumulation = len(loader), args.gradient_accumulation_steps
        self._per_epoch = per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)  # as Trainer
        self._save_steps = state.save_steps if args.save_strategy == SaveStrategy.STEPS else 0
        self._save_epochs = args.save_strategy == SaveStrategy.EPOCH
        self.plan = IntervalPlan((per_epoch, self._save_steps), state.max_steps)
        self._causal = _shifts_labels(model)
        per_round = args.per_device_train_batch_size * args.world_size
        if args.world_size > 1 and not args.dataloader_drop_last and len(loader.dataset) % per_round:
            self._warn_once(
                "even",
                f"{len(loader.dataset)} examples do not fill the last round of {per_round}: accelerate repeats a few "
                "to even out the ranks, and those are logged twice in their epoch; set dataloader_drop_last=True",
            )
        self.session = CaptureSession(
            model, self.store, self.rank, self.init, self.layers, self.seed, self.dtype, self.chunk_rows
        )
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._pending, self._forwards = None, 0

    def _saved_by_trainer(self, step: int) -> bool:
        """Whether the Trainer's schedule saves a checkpoint folder at global step ``step``."""
        if step == 0:
            return False
        if self._save_steps:
            return step % self._save_steps == 0 or step == self.plan.max_steps
        return self._save_epochs and (step % self._per_epoch == 0 or step == self.plan.max_steps)

    def _open_interval(self, state: TrainerState) -> None:
        assert self.session is not None
        step = state.global_step
        start, end = self.plan.bounds(step)
        saved = self._output / f"{PREFIX_CHECKPOINT_DIR}-{start}" if self._saved_by_trainer(start) else None
        own = self._own / f"step-{start}"
        weights = weights_at(start, step, self._model, saved, own, self._writer)
        optimizer_path = next(
            (str(f / "optimizer.pt") for f in (saved, own) if f and (f / "optimizer.pt").is_file()), None
        )
        adam_state: str | None = None
        if self.adam_correction:
            if start == 0:
                self._warn_once("adam0", "the first interval starts with no Adam state: it is logged uncorrected")
            else:
                if optimizer_path is None and start == step and self._optimizer is not None:
                    if self._writer:
                        own.mkdir(parents=True, exist_ok=True)
                        torch.save(self._optimizer.state_dict(), own / "optimizer.pt")
                    barrier()
                    optimizer_path = str(own / "optimizer.pt")
                if optimizer_path is None:
                    self._warn_once(f"adam{start}", f"no optimizer state of step {start}: interval logged uncorrected")
                adam_state = optimizer_path
        lr, exact = interval_lr(self._scheduler, self._optimizer, start, end, step)  # type: ignore[arg-type]
        if not exact:
            self._warn_once(
                "lr",
                f"cannot evaluate {type(self._scheduler).__name__} ahead; each checkpoint gets its starting lr",
            )
        interval = Interval(f"{PREFIX_CHECKPOINT_DIR}-{end}", start, end, lr, weights, optimizer_path)
        self.session.open_interval(interval, adam_state)

    # -- per micro-batch -------------------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if IDS_KEY not in kwargs:
            return None
        kwargs = dict(kwargs)
        ids = np.asarray(kwargs.pop(IDS_KEY).cpu(), dtype=np.int64).reshape(-1)
        if module.training and torch.is_grad_enabled():
            self._pending = (ids, self._normalizer(kwargs))
            self._labels = kwargs.get("labels")
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._pending is None:
            return
        ids, normalizer = self._pending
        self._pending = None
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise CaptureError(
                "GradstoreTrainerCallback needs the model's own loss (outputs.loss, from labels in the batch) to be "
                "the one back-propagated; this forward returned none "
                "(label smoothing or a compute_loss_func pops the labels)"
            )
        assert self.session is not None
        losses = None
        if self.session.logger.capture_check_pending:  # the first window is checked per example when we can tell
            losses = example_losses(output, self._labels, self._causal, normalizer)
        self.session.watch(loss, ids, normalizer, self._scaler, losses)
        self._forwards += 1

    def _normalizer(self, kwargs: Mapping[str, Any]) -> float | torch.Tensor:
        """``N`` of this micro-batch; a tensor stays one (on its device: reading it would wait for the device, every
        step; the writer thread reads it with the rows)."""
        if self.loss_normalizer is not None:
            given = self.loss_normalizer(kwargs)
            return given.reshape(()) if isinstance(given, torch.Tensor) else float(given)
        items = kwargs.get("num_items_in_batch")
        if items is not None:
            return items.reshape(-1)[0] if isinstance(items, torch.Tensor) else float(items)
        labels = kwargs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise CaptureError(
                "GradstoreTrainerCallback cannot tell how the model's loss is normalised: the batch has no 'labels' "
                "tensor; pass loss_normalizer=fn(batch) -> N, where the loss is the sum of per-example losses / N"
            )
        if labels.dim() == 1:
            return float(labels.shape[0])
        valid = labels[..., 1:] if self._causal else labels
        return (valid != -100).sum()

    def _check_captured(self) -> None:
        assert self.session is not None
        if self._forwards != self.session.windows:
            missing = self._forwards - self.session.windows
            raise CaptureError(
                f"{missing} training forward(s) were not back-propagated through the model's output loss, so their "
                "examples were not logged; GradstoreTrainerCallback needs the Trainer to back-propagate outputs.loss "
                "(no compute_loss_func, no compute_loss override building another loss)"
            )

    # -- Trainer events --------------------------------------------------------------------------------------------
    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.session is not None and self.session.interval is None:
            self._open_interval(state)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.session is not None:
            self._check_captured()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        session = self.session
        if session is None:
            return
        self._check_captured()
        if session.interval is not None and state.global_step >= session.interval.end:
            session.close_interval()  # commits its rows before the Trainer saves the state a resume starts from
        elif control.should_save or control.should_evaluate:
            session.flush()  # a save may follow (save_strategy="best", or another callback's request)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        session = self.session
        if session is None or session.interval is None:
            return
        if state.global_step > session.interval.start:  # the epoch ended before the interval's predicted end
            self._warn_once("epoch", f"epoch ended at step {state.global_step}, inside {session.interval.name}")
            session.close_interval()
        elif control.should_save:
            session.flush()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.session is not None:
            self.session.flush()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.session is not None:
            self.session.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.close()

    def close(self) -> None:
        """Commit the open interval, stop the writer and undo every hook and patch (also called at train end)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tagged is not None:
            self._tagged.remove()
            self._tagged = None
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"GradstoreTrainerCallback: {message}", stacklevel=3)


def example_losses(output: Any, labels: Any, causal: bool, normalizer: float | torch.Tensor) -> torch.Tensor | None:
    """Each example's cross-entropy summed over its label tokens, from a model's logits, when they reproduce the
    model's own loss (``sum / normalizer``); None when they do not (another loss, label smoothing, no logits)."""
    logits = output.get("logits") if isinstance(output, Mapping) else None
    loss = output.get("loss") if isinstance(output, Mapping) else None
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor) or loss is None:
        return None
    if causal and labels.dim() == 2:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.shape[:-1] != labels.shape or labels.is_floating_point():
        return None
    flat = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none", ignore_index=-100)
    losses = flat.view(labels.shape[0], -1).sum(dim=1)
    tolerance = 1e-3 if logits.dtype == torch.float32 and not torch.is_autocast_enabled(logits.device.type) else 2e-2
    if not torch.allclose(losses.sum().detach() / normalizer, loss.detach().float(), rtol=tolerance, atol=1e-6):
        return None
    return losses


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts label ``t+1`` at position ``t`` (a decoder-only causal LM)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or getattr(model, "loss_type", None) in (
        "ForCausalLM",
        "ForCausalLMLoss",
    )


def __getattr__(name: str) -> type:
    # the name both callbacks had before each got its own (one release of grace for existing scripts)
    if name == "GradstoreCallback":
        import warnings

        warnings.warn("GradstoreCallback is now GradstoreTrainerCallback", DeprecationWarning, stacklevel=2)
        return GradstoreTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
