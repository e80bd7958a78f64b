"""What the Hugging Face and Lightning callbacks share: intervals, example ids, and capture around a backward.

A training run is cut into *intervals* of optimizer steps ``(start, end]``; each is one gradstore checkpoint. Its
rows are every example trained in it, each at the weights of its own step (a by-product of the backward the
trainer runs anyway); its metadata says how a query should be answered for it:

- ``weights_path``: the weights at the interval's *start* (README, "What capture approximates": gradients are
  largest early in an interval, so the starting weights are the best single set);
- ``optimizer_path`` and the Adam factors (``adam_correction=True``): the optimizer state at the interval's start,
  the one its first step was preconditioned with;
- ``lr``: the mean of the learning rates the interval's steps used (TracIn weights each example by its step's
  rate; every step trains the same number of examples, so the mean gives the interval its total weight, while
  the start rate would give a warm-up interval starting at 0 no weight at all);
- ``step``: the global step the interval ends at (the step its name carries).

Boundaries are the trainer's scheduled saves, the ends of epochs (an example is trained once per epoch, so no
interval holds it twice) and the last step.

Example ids are dataset indices. :func:`tag_dataloader` (Hugging Face) makes the train dataloader's dataset return,
with each batch's features, the indices it was asked for, and its collate function puts them into the batch
(``batch[IDS_KEY]``), so they travel with the batch through samplers, workers, prefetching and skipped batches.
:func:`queue_batch_indices` (Lightning, whose first iterator exists before any callback runs) queues each batch's
indices as its ``BatchSampler`` draws them.

Per-example scaling: :meth:`CaptureSession.watch` reads the gradient arriving at the model's loss when its backward
starts (the product of every factor applied after the model), :meth:`CaptureSession.begin` takes the factor when
the caller knows it; either way each row is the gradient of the example's own loss summed over its tokens.
"""

from __future__ import annotations

import collections
import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradstore.projection.spec import Init
from gradstore.store import CheckpointInfo, file_sha256
from gradstore.store.gradient_store import StoreDtype

from .adam_fold import adam_fold
from .errors import CaptureError
from .gradient_logger import CaptureReference, GradientLogger
from .projector import Rank

IDS_KEY = "gradstore_example_ids"
"""The batch entry holding the examples' dataset indices (removed before the model sees the batch)."""


# -- intervals -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalPlan:
    """Interval boundaries: every multiple of each period (save steps, steps per epoch) and ``max_steps``."""

    periods: tuple[int, ...]
    max_steps: int

    def bounds(self, step: int) -> tuple[int, int]:
        """``(start, end)`` of the interval holding the optimizer step that follows global step ``step``."""
        periods = [p for p in self.periods if p > 0]
        start = max([(step // p) * p for p in periods], default=0)
        ends = [(step // p + 1) * p for p in periods] + ([self.max_steps] if self.max_steps > step else [])
        return start, min(ends, default=step + 1)


@dataclass(frozen=True)
class Interval:
    """One gradstore checkpoint of a training run: steps ``(start, end]``."""

    name: str
    start: int
    end: int
    lr: float
    weights_path: str | None = None
    optimizer_path: str | None = None


def interval_lr(
    scheduler: Any, optimizer: torch.optim.Optimizer, start: int, end: int, current: int
) -> tuple[float, bool]:
    """The mean learning rate of steps ``start+1 .. end`` (first parameter group); ``(lr, exact)``.

    Step ``t+1`` uses the rate the scheduler gives after ``t`` ``scheduler.step()`` calls. Exact for no scheduler,
    ``LambdaLR`` (every Hugging Face schedule) and schedulers with a closed form; otherwise the current rate.
    """
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps one
    steps = range(start, end)
    if scheduler is None:
        return float(optimizer.param_groups[0]["lr"]), True
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        base, fn = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
        return math.fsum(base * fn(t) for t in steps) / len(steps), True
    closed = getattr(scheduler, "_get_closed_form_lr", None)
    if closed is not None:
        rates = []
        saved = scheduler.last_epoch
        try:
            for t in steps:
                scheduler.last_epoch = t
                rates.append(float(closed()[0]))
        finally:
            scheduler.last_epoch = saved
        return math.fsum(rates) / len(rates), True
    return float(optimizer.param_groups[0]["lr"]), current == start


def save_weights(model: nn.Module, folder: Path) -> Path:
    """Save ``model``'s weights into ``folder`` (``save_pretrained`` when it has one); returns the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(folder)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).exists():
                return folder / name
    path = folder / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- example ids ---------------------------------------------------------------------------------------------------


class _IndexedFeatures(list):
    """A batch's features as the dataset returned them, with the dataset indices they came from."""

    indices: list[int]


class _IndexedGetitems:
    """Installed as a dataset's ``__getitems__``: the torch fetcher then asks it for each batch by its indices."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.getitems = getattr(type(dataset), "__getitems__", None)  # the class's, unbound: pickles by name

    def __call__(self, indices: Sequence[int]) -> _IndexedFeatures:
        items = (
            self.getitems(self.dataset, indices) if self.getitems is not None else [self.dataset[i] for i in indices]
        )
        out = _IndexedFeatures(items)
        out.indices = [int(i) for i in indices]
        return out


class _IndexedCollate:
    """Wraps a dataloader's collate function: the collated batch gets the indices under :data:`IDS_KEY`."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, features: list) -> Any:
        indices = getattr(features, "indices", None)
        if indices is None:
            return self.collate(features)
        batch = self.collate(list(features))
        if not isinstance(batch, MutableMapping):
            raise CaptureError(
                f"gradstore puts each batch's dataset indices into the batch, which needs a dict batch; the collate "
                f"function returned {type(batch).__name__}. Return a dict, or have the dataset return each example's "
                "index and pass ids=... to the callback"
            )
        batch[IDS_KEY] = torch.tensor(indices, dtype=torch.long)
        return batch


class _IndexedDataset(torch.utils.data.Dataset):
    """Stands in for a dataset that cannot take an attribute (a list): the same items, fetched with their indices."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.__getitems__ = _IndexedGetitems(dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class TaggedLoader:
    """What :func:`tag_dataloader` changed on a dataloader; :meth:`remove` restores it."""

    def __init__(self, loader: Any):
        loader = getattr(loader, "base_dataloader", loader)  # accelerate's DataLoaderAdapter delegates to it
        self.loader, self.dataset = loader, loader.dataset
        self.collate = loader.collate_fn
        self.patched = hasattr(self.dataset, "__dict__")
        if self.patched:  # the fetcher looks __getitems__ up on the instance: the dataset object stays the same
            self.dataset.__getitems__ = _IndexedGetitems(self.dataset)
        else:  # DataLoader refuses a new dataset through setattr once built; no iterator exists yet
            object.__setattr__(loader, "dataset", _IndexedDataset(self.dataset))
        loader.collate_fn = _IndexedCollate(self.collate)

    def remove(self) -> None:
        self.loader.collate_fn = self.collate
        if self.patched:
            vars(self.dataset).pop("__getitems__", None)
        else:
            object.__setattr__(self.loader, "dataset", self.dataset)


def tag_dataloader(loader: Any) -> TaggedLoader:
    """Make every batch ``loader`` yields carry its examples' dataset indices under :data:`IDS_KEY`."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise CaptureError(
            f"gradstore needs each training example's dataset index, which an iterable dataset "
            f"({type(dataset).__name__}) does not have; use a map-style dataset (with __getitem__ and __len__)"
        )
    if getattr(loader, "batch_sampler", None) is None:
        raise CaptureError(
            "the train dataloader has no batch sampler (batch_size=None), so gradstore cannot see which indices "
            "each batch holds; build it with batch_size= or batch_sampler="
        )
    if isinstance(dataset, _IndexedDataset) or isinstance(
        getattr(dataset, "__dict__", {}).get("__getitems__"), _IndexedGetitems
    ):
        raise CaptureError("this dataloader is already tagged by another gradstore callback; use one per run")
    return TaggedLoader(loader)


class _RecordingSampler:
    """Stands in for a BatchSampler's sampler and queues each batch's indices as the BatchSampler will group them."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, queue: collections.deque):
        self.sampler, self.batch_size, self.drop_last, self.queue = sampler, batch_size, drop_last, queue

    def __iter__(self) -> Iterator[Any]:
        group: list[int] = []
        for index in self.sampler:
            group.append(int(index))
            if len(group) == self.batch_size:  # queued before the BatchSampler sees the batch's last index
                self.queue.append(group)
                group = []
            yield index
        if group and not self.drop_last:
            self.queue.append(group)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:  # set_epoch and the like reach the real sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


class QueuedLoader:
    """Queues the dataset indices of every batch a dataloader draws, in order (see :func:`queue_batch_indices`)."""

    def __init__(self, batch_sampler: Any):
        self.batch_sampler, self.sampler = batch_sampler, batch_sampler.sampler
        self.queue: collections.deque[list[int]] = collections.deque()
        batch_sampler.sampler = _RecordingSampler(
            self.sampler, batch_sampler.batch_size, batch_sampler.drop_last, self.queue
        )

    def next_ids(self) -> np.ndarray:
        """The indices of the next batch the training loop takes."""
        if not self.queue:
            raise CaptureError(
                "a training batch arrived whose indices gradstore did not see drawn (the dataloader was reloaded, or "
                "iterated before training started); have the dataset return each example's id and pass ids=..."
            )
        return np.asarray(self.queue.popleft(), dtype=np.int64)

    def remove(self) -> None:
        self.batch_sampler.sampler = self.sampler


def queue_batch_indices(loader: Any) -> QueuedLoader:
    """Record the indices of each batch ``loader`` draws, for a loop that takes batches in order in this process.

    Unlike :func:`tag_dataloader` this works on a dataloader whose iterator already exists but has drawn nothing
    (Lightning creates the first epoch's before ``on_train_start``), and for any batch type; it needs a torch
    ``BatchSampler`` and no worker processes (they would draw the first epoch's indices early).
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(batch_sampler, torch.utils.data.BatchSampler):
        raise CaptureError(
            f"gradstore reads batch indices from a torch BatchSampler; this dataloader has "
            f"{type(batch_sampler).__name__}. Have the dataset return each example's id and pass ids=..."
        )
    if getattr(loader, "num_workers", 0) > 0:
        raise CaptureError(
            "with num_workers > 0 the first epoch's indices are drawn before training starts, where gradstore cannot "
            "see them; use num_workers=0, or have the dataset return each example's id and pass ids=..."
        )
    if isinstance(batch_sampler.sampler, _RecordingSampler):
        raise CaptureError("this dataloader is already recorded by another gradstore callback; use one per run")
    return QueuedLoader(batch_sampler)


# -- capture -------------------------------------------------------------------------------------------------------


class CaptureSession:
    """One GradientLogger on a training model, the interval it writes, and capture windows around backwards."""

    def __init__(
        self,
        model: nn.Module,
        store: str | Path,
        rank: Rank,
        init: Init,
        layers: Sequence[str],
        seed: int,
        dtype: StoreDtype,
        chunk_rows: int | None,
    ):
        self.logger = GradientLogger(
            model,
            None,
            store=store,
            rank=rank,
            init=init,
            layers=layers,
            seed=seed,
            dtype=dtype,
            chunk_rows=chunk_rows,
            progress=False,
        )
        self.model = model
        self.interval: Interval | None = None
        self.windows = 0  # capture windows completed (one per captured backward)
        self._window: contextlib.AbstractContextManager | None = None
        self._adam: contextlib.AbstractContextManager | None = None

    # intervals
    def open_interval(self, interval: Interval, optimizer_state: str | Path | Mapping[str, Any] | None = None) -> None:
        """Begin ``interval``'s checkpoint; with ``optimizer_state``, its rows (and queries) get the Adam correction."""
        self.close_interval()
        fold = None
        if optimizer_state is not None:
            fold = adam_fold(self.model, self.logger.layers, self.logger.spec, optimizer_state)
        info = CheckpointInfo(
            name=interval.name,
            lr=float(interval.lr),
            step=interval.end,
            weights_path=interval.weights_path,
            weights_sha256=file_sha256(interval.weights_path) if interval.weights_path is not None else None,
            optimizer_path=interval.optimizer_path,
            adam=fold is not None,
            adam_summary=fold.summary if fold is not None else None,
        )
        self.logger.begin_capture(info, fold.factors if fold is not None else None)
        if fold is not None:
            self._adam = self.logger.adam_correction(fold.factors)
            self._adam.__enter__()
        self.interval = interval

    def close_interval(self) -> None:
        """Commit the open interval's rows and stop its Adam correction."""
        self.flush()
        if self._adam is not None:
            adam, self._adam = self._adam, None
            adam.__exit__(None, None, None)
        self.interval = None

    # capture windows
    def begin(
        self,
        ids: np.ndarray,
        loss_scale: float | torch.Tensor,
        reduction: str = "sum",
        scaler: Any | None = None,
        losses: torch.Tensor | CaptureReference | None = None,
    ) -> None:
        """Arm the per-example buffer for the backward that follows (see :meth:`GradientLogger.capture`)."""
        if self.interval is None:
            raise CaptureError("a training backward ran outside any gradstore interval; this is a gradstore bug")
        if self._window is not None:  # a backward that never finished (it raised): drop its window
            stale, self._window = self._window, None
            with contextlib.suppress(Exception):
                stale.__exit__(RuntimeError, RuntimeError("abandoned"), None)
        window = self.logger.capture(
            self.interval.name,
            self.interval.lr,
            ids,
            reduction=reduction,  # type: ignore[arg-type]
            scaler=scaler,
            loss_scale=loss_scale,
            losses=losses,
        )
        window.__enter__()
        self._window = window

    def end(self) -> None:
        """Disarm after the backward and hand the rows to the writer."""
        window, self._window = self._window, None
        if window is not None:
            window.__exit__(None, None, None)
            self.windows += 1

    def watch(
        self,
        loss: torch.Tensor,
        ids: np.ndarray,
        normalizer: float | torch.Tensor,
        scaler: Any | None,
        losses: torch.Tensor | None = None,
    ) -> None:
        """Capture ``ids`` during the backward of ``loss = sum_i loss_i / normalizer``, however it is scaled later.

        The gradient arriving at ``loss`` is the product of every factor applied after it (gradient accumulation,
        a GradScaler's scale, a world-size factor), so dividing by it and ``normalizer`` gives each example's
        gradient of its own summed loss. The window closes when that backward finishes. ``losses``: the per-example
        ``loss_i`` when known, for the first window's exactness check (taken now, before the backward runs).
        """
        reference = None
        if losses is not None and self.logger.capture_check_pending:
            reference = self.logger.capture_reference(losses)

        def started(grad: torch.Tensor) -> None:
            # kept on the device: the writer thread reads it with the rows (float() here would wait for the device)
            factor = grad.detach().float().sum()
            if factor.device.type in ("cpu", "cuda"):
                factor = factor.double()  # as float() gave it, for the float64 arithmetic below
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self.begin(ids, factor / (normalizer * scale), "sum", scaler, reference)
            torch.autograd.Variable._execution_engine.queue_callback(self.end)  # runs when this backward ends

        loss.register_hook(started)

    # lifecycle
    def flush(self) -> None:
        self.logger.flush()

    def close(self) -> None:
        try:
            self.close_interval()
        finally:
            self.logger.close()


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "weights.pt")


def find_weights(folder: Path) -> Path | None:
    """The weights file in a checkpoint folder (safetensors first), or None."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def weights_at(
    start: int, current: int, model: nn.Module, saved_folder: Path | None, own_folder: Path, is_writer: bool
) -> str | None:
    """The weights file of global step ``start``, where an interval begins.

    ``saved_folder``: where the trainer saved that step, used when it holds weights. Otherwise, when ``start`` is
    the current step, the model is saved into ``own_folder`` (by the writing process; the others wait for it). A
    run resumed inside an interval finds the copy saved when the interval began, or gets None with a warning.
    """
    barrier()  # every rank past the trainer's last save, so all see the same files
    found = find_weights(saved_folder) if saved_folder is not None else None
    if found is None and start == current:
        if is_writer:
            save_weights(model, own_folder)
        barrier()
    found = found or find_weights(own_folder)
    if found is None:
        warnings.warn(
            f"the weights of step {start}, where this interval starts, are in neither {saved_folder} nor "
            f"{own_folder}; its checkpoint has no weights path (give one in the run config to query it)",
            stacklevel=3,
        )
        return None
    return str(found)
