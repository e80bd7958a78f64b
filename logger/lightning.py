"""Lightning integration: log every training example's projected gradient while ``lightning.Trainer`` trains.

``Trainer(..., callbacks=[GradstoreLightningCallback(store="runs/x.zarr", rank=16, reduction="mean")])``. Each interval
(an epoch, or ``every_n_steps`` optimizer steps, never across an epoch's end) is one gradstore checkpoint named
``step-{end}``; see :mod:`gradstore.logger.callbacks` for what it records.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gradstore.projection.spec import Init
from gradstore.store.gradient_store import StoreDtype

from .callbacks import (
    CaptureSession,
    Interval,
    IntervalPlan,
    QueuedLoader,
    barrier,
    interval_lr,
    queue_batch_indices,
    weights_at,
)
from .errors import CaptureError
from .projector import Rank

__all__ = ["GradstoreLightningCallback"]

Reduction = Literal["mean", "sum"] | Callable[[Any], float]


class GradstoreLightningCallback(pl.Callback):
    """Logs each training example's projected gradient, at the weights of its step, as Lightning trains.

    Args:
        store: path of the Zarr store (created if absent; a resumed run appends to it).
        rank, init, layers, seed, dtype, chunk_rows: as for :class:`~gradstore.logger.GradientLogger`.
        reduction: how ``training_step``'s loss reduces the batch's per-example losses (each summed over the
            example's tokens): ``"mean"`` over examples, ``"sum"``, or ``fn(batch) -> N`` for ``sum / N`` (e.g. a
            token mean: ``lambda b: (b["labels"][:, 1:] != -100).sum()``). Default: the LightningModule's
            ``gradstore_reduction`` attribute, else ``"mean"``. Lightning's ``1/accumulate_grad_batches`` and a
            GradScaler's scale are undone for you.
        ids: where each batch's example ids are: None (default) reads the dataset indices each batch is drawn
            with from the train dataloader's ``BatchSampler`` (``num_workers=0``); a key of a dict batch; or
            ``fn(batch) -> ids`` (for a dataset that returns its index, any loader).
        module: attribute of the LightningModule holding the model to log (e.g. ``"model"``); default the
            LightningModule itself. Its weights are what each checkpoint's ``weights_path`` holds.
        every_n_steps: optimizer steps per interval (default: one interval per epoch).
        adam_correction: fold the Adam second moment at each interval's start into its projection (TrackStar);
            the first interval has no state yet and is logged uncorrected.
        weights_dir: where interval-start weights (and optimizer states) are saved (default
            ``{default_root_dir}/gradstore-weights``).
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
        reduction: Reduction | None = None,
        ids: str | Callable[[Any], Any] | None = None,
        module: str | None = None,
        every_n_steps: int | None = None,
        adam_correction: bool = False,
        weights_dir: str | Path | None = None,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise CaptureError(f"every_n_steps must be a positive number of optimizer steps, got {every_n_steps}")
        self.store, self.rank, self.layers, self.init, self.seed = store, rank, list(layers), init, seed
        self.dtype, self.chunk_rows, self.reduction, self.ids = dtype, chunk_rows, reduction, ids
        self.module, self.every_n_steps, self.adam_correction = module, every_n_steps, adam_correction
        self.weights_dir = weights_dir
        self.session: CaptureSession | None = None
        self._queued: QueuedLoader | None = None
        self._batch: tuple[np.ndarray, Any] | None = None
        self._warned: set[str] = set()

    # -- setup -----------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        model = getattr(pl_module, self.module) if self.module else pl_module
        if not isinstance(model, nn.Module):
            raise CaptureError(
                f"GradstoreLightningCallback(module={self.module!r}) is not a torch module of the LightningModule"
            )
        reduction = self.reduction if self.reduction is not None else getattr(pl_module, "gradstore_reduction", "mean")
        if not callable(reduction) and reduction not in ("mean", "sum"):
            raise CaptureError(f"reduction must be 'mean', 'sum' or fn(batch) -> N, got {reduction!r}")
        self._reduction: Reduction = reduction  # type: ignore[assignment]
        self._model = model
        root = Path(trainer.default_root_dir)
        self._own = Path(self.weights_dir) if self.weights_dir is not None else root / "gradstore-weights"
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise CaptureError(
                "GradstoreLightningCallback needs a train dataloader with a length (a map-style dataset)"
            )
        per_epoch = math.ceil(int(batches) / trainer.accumulate_grad_batches)
        max_steps = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self.plan = IntervalPlan((per_epoch, self.every_n_steps or 0), max_steps)
        self.session = CaptureSession(
            model, self.store, self.rank, self.init, self.layers, self.seed, self.dtype, self.chunk_rows
        )
        if self.ids is None:
            loader = trainer.train_dataloader
            if not isinstance(loader, torch.utils.data.DataLoader):
                raise CaptureError(
                    f"GradstoreLightningCallback reads dataset indices from one train DataLoader; got "
                    f"{type(loader).__name__}. Have the dataset return each example's id and pass ids='key' or "
                    "ids=fn(batch)"
                )
            self._queued = queue_batch_indices(loader)

    def _open_interval(self, trainer: pl.Trainer) -> None:
        assert self.session is not None
        step = trainer.global_step
        start, end = self.plan.bounds(step)
        own = self._own / f"step-{start}"
        writer = trainer.is_global_zero
        weights = weights_at(start, step, self._model, None, own, writer)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        optimizer_path = str(own / "optimizer.pt") if (own / "optimizer.pt").is_file() and start != step else None
        if self.adam_correction and start > 0 and optimizer is not None and start == step:
            if writer:
                torch.save(optimizer.state_dict(), own / "optimizer.pt")
            barrier()
            optimizer_path = str(own / "optimizer.pt")
        if self.adam_correction and optimizer_path is None:
            self._warn_once(f"adam{start}", f"no Adam state at step {start}: its interval is logged uncorrected")
        lr = self._lr(trainer, optimizer, start, end, step)
        interval = Interval(f"step-{end}", start, end, lr, weights, optimizer_path)
        self.session.open_interval(interval, optimizer_path if self.adam_correction else None)

    def _lr(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None, start: int, end: int, step: int
    ) -> float:
        if optimizer is None:
            return 0.0
        configs = trainer.lr_scheduler_configs
        if not configs:
            return interval_lr(None, optimizer, start, end, step)[0]
        config = configs[0]
        if config.interval == "step" and config.frequency == 1:
            lr, exact = interval_lr(config.scheduler, optimizer, start, end, step)
        else:
            lr, exact = float(optimizer.param_groups[0]["lr"]), start == step
        if not exact:
            self._warn_once("lr", "the lr schedule cannot be evaluated ahead; each checkpoint gets its starting lr")
        return lr

    # -- per batch -------------------------------------------------------------------------------------------------
    def _batch_ids(self, batch: Any) -> np.ndarray:
        if self._queued is not None:
            return self._queued.next_ids()
        raw = self.ids(batch) if callable(self.ids) else batch[self.ids]
        return np.asarray(raw.cpu() if isinstance(raw, torch.Tensor) else raw, dtype=np.int64).reshape(-1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.session is None:
            return
        self._batch = (self._batch_ids(batch), batch)
        if self.session.interval is None:
            self._open_interval(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.session is None or self._batch is None:
            return
        ids, batch = self._batch
        accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if callable(self._reduction):
            normalizer = self._reduction(batch)  # a tensor stays on its device: read on the writer thread
            if not isinstance(normalizer, torch.Tensor):
                normalizer = float(normalizer)
            self.session.begin(ids, 1.0 / (accumulation * normalizer), "sum", scaler)
        else:
            self.session.begin(ids, 1.0 / accumulation, self._reduction, scaler)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.end()
            self._batch = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        session = self.session
        if session is not None and session.interval is not None and trainer.global_step >= session.interval.end:
            session.close_interval()  # before ModelCheckpoint (always the last callback) saves

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        if session is not None and session.interval is not None and trainer.global_step > session.interval.start:
            self._warn_once("epoch", f"epoch ended at step {trainer.global_step}, inside {session.interval.name}")
            session.close_interval()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.session is not None:
            self.session.flush()  # the checkpoint is written after this hook: a resume from it loses no row

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._queued is not None:
            self._queued.remove()
            self._queued = None
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"GradstoreLightningCallback: {message}", stacklevel=3)


def __getattr__(name: str) -> type:
    # the name both callbacks had before each got its own (one release of grace for existing scripts)
    if name == "GradstoreCallback":
        import warnings

        warnings.warn("GradstoreCallback is now GradstoreLightningCallback", DeprecationWarning, stacklevel=2)
        return GradstoreLightningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
