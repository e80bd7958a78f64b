"""GradientLogger: hooks a model and writes Kronecker-projected per-example gradients to a store."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gradstore.projection import ProjectionMismatchError, ProjectionSpec, build_matrices, fold_denominator, matrices_checksum
from gradstore.store import AppendWriter, BackgroundWriter, CheckpointInfo, ChunkBuffer, DuplicateIdError, GradientStore, file_sha256

from .errors import NonFiniteGradientError, TaskError
from .hooks import CaptureState, LayerHook, frozen_parameters
from .layers import select_layers
from .optimizer_state import adam_factors, split_factors
from .pca import pca_bases
from .task import Task, move_to_device

Rank = int | tuple[int, int]


class GradientLogger:
    """Computes LoGra-style projected per-example gradients of ``model`` and logs them to a store.

    Args:
        model: the model to hook (its selected modules get forward hooks until :meth:`close`).
        task: the user's :class:`Task` (data, collate, per-example loss).
        store: path of the Zarr store to write (created if absent), or None to only :meth:`project`.
        rank: ``k`` for both sides, or ``(k_in, k_out)``; clipped to each layer's dimensions.
        init: ``gaussian`` | ``rademacher`` | ``orthonormal`` | ``pca``.
        layers: glob patterns on module names (``named_modules``); each must match a supported module.
        seed: projection seed; with the same arguments two loggers project into the same space.
        dtype: stored precision, ``float16`` (default) or ``float32``.
        chunk_rows: rows per Zarr chunk (the unit of writing, committing and resuming).
        pca_examples: examples for the ``init="pca"`` statistics pass (default: the first 1024 training examples).
        process_rank, world_size: this writer's share of a distributed pass (default: from torch.distributed).
        progress: show progress bars.
        spec: reuse an existing projection (e.g. ``store.spec`` to project queries exactly as a store was
            logged); ``rank``, ``init``, ``layers`` and ``seed`` are then ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        store: str | Path | None = None,
        rank: Rank = 8,
        init: Literal["gaussian", "rademacher", "orthonormal", "pca"] = "gaussian",
        layers: Sequence[str] = ("*",),
        seed: int = 0,
        dtype: Literal["float16", "float32"] = "float16",
        chunk_rows: int = 1024,
        pca_examples: Sequence | None = None,
        process_rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        spec: ProjectionSpec | None = None,
    ):
        self.model, self.task, self.progress = model, task, progress
        self.device = next(model.parameters()).device
        if spec is not None:
            layers = [layer.name for layer in spec.layers]
        self.layers = select_layers(model, list(layers))
        _warn_on_shared_weights(self.layers)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.process_rank = process_rank if process_rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        self._distributed = distributed and self.world_size > 1

        self.store: GradientStore | None = None
        existing = store is not None and (Path(store) / "zarr.json").exists()
        if spec is not None:
            found = [layer.dims() for layer in self.layers]
            expected = [(l.name, l.kind, l.d_in, l.d_out, l.bias) for l in spec.layers]
            if found != expected:
                raise ProjectionMismatchError(f"the model's layers {found} do not match the projection spec's {expected}")
        elif init == "pca" and existing:
            spec = GradientStore.open(store).spec  # PCA bases are data: reuse the ones the store was written with
        else:
            bases = None
            if init == "pca":
                bases = self._pca_bases(rank, pca_examples)
            spec = ProjectionSpec.build([layer.dims() for layer in self.layers], rank, init=init, seed=seed, pca_bases=bases)
        self.base_matrices = build_matrices(spec, device=self.device, verify=spec.matrix_sha256 is not None)
        self.spec = spec if spec.matrix_sha256 else spec.with_checksum(matrices_checksum(self.base_matrices))
        if store is not None:
            self.store = self._open_store(Path(store), dtype, chunk_rows)
        self._state = CaptureState(dict(self.base_matrices), self.spec.dim)
        self._hooks = [LayerHook(layer, layer_spec, self._state) for layer, layer_spec in zip(self.layers, self.spec.layers)]
        self._writer = BackgroundWriter()
        self._sinks: dict[str, AppendWriter] = {}
        self._capture_seen: dict[str, set[int]] = {}
        self._capture_done: dict[str, set[int]] = {}

    # -- setup -----------------------------------------------------------------------------------
    def _pca_bases(self, rank: Rank, examples: Sequence | None) -> dict:
        task = self._require_task()
        if examples is None:
            train = task.train_examples()
            examples = [train[i] for i in range(min(len(train), 1024))]
        k = (rank, rank) if isinstance(rank, int) else tuple(rank)
        return pca_bases(self.model, task, self.layers, examples, k, device=self.device)

    def _open_store(self, path: Path, dtype: str, chunk_rows: int) -> GradientStore:
        if self.process_rank == 0:
            store = GradientStore.open_or_create(path, self.spec, dtype=dtype, chunk_rows=chunk_rows)
        self._barrier()
        if self.process_rank != 0:
            store = GradientStore.open(path, mode="a")
            store.check_compatible(self.spec, dtype)
        return store

    def _barrier(self) -> None:
        if self._distributed:
            torch.distributed.barrier()

    def _require_task(self) -> Task:
        if self.task is None:
            raise TaskError("this operation needs a Task: GradientLogger(model, task, ...)")
        return self.task

    def _require_store(self) -> GradientStore:
        if self.store is None:
            raise TaskError("this logger has no store: pass store=PATH to GradientLogger")
        return self.store

    # -- projection ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adam_correction(self, factors: tuple[np.ndarray, np.ndarray] | None) -> Iterator[None]:
        """Use projections with Adam's denominator folded in (``None``: the plain ones) inside the block."""
        if factors is None:
            yield
            return
        previous = self._state.matrices
        per_layer = split_factors(self.spec, factors)
        self._state.matrices = {
            name: fold_denominator(matrices, *per_layer[name]) for name, matrices in self.base_matrices.items()
        }
        try:
            yield
        finally:
            self._state.matrices = previous

    def project(self, examples: Sequence, measurement: bool = False) -> torch.Tensor:
        """Projected gradients ``[B, D]`` (float32, on the model's device) of a batch of examples at the current weights.

        Uses the per-example loss, or the Task's measurement when ``measurement`` is true. The model is
        put in eval mode for the call and parameters' ``.grad`` are left untouched.
        """
        task = self._require_task()
        batch = move_to_device(task.collate(list(examples)), self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with frozen_parameters(self.model, self._state), self._state.armed(len(examples), self.device):
                values = (task.measurement if measurement else task.loss)(self.model, batch)
                _check_losses(values, len(examples))
                if values.requires_grad:
                    values.sum().backward()
                return self._state.disarm()
        finally:
            self.model.train(was_training)

    # -- offline pass ----------------------------------------------------------------------------
    def log_checkpoint(
        self,
        name: str,
        lr: float,
        examples: Sequence | None = None,
        batch_size: int = 64,
        step: int | None = None,
        weights_path: str | Path | None = None,
        optimizer_state: str | Path | Mapping[str, Any] | None = None,
        adam_step: int | None = None,
        adam_eps: float = 1e-8,
    ) -> int:
        """Log every example's projected gradient at the model's current weights; resumable.

        Rows already committed by an earlier (interrupted) call are skipped. With several processes
        each writes the chunks it owns (chunk ``k`` belongs to rank ``k % world_size``). Returns the
        number of rows this process computed.

        ``optimizer_state``: Adam state (path, ``optimizer.state_dict()`` or ``{param: exp_avg_sq}``)
        to apply TrackStar's second-moment correction for this checkpoint.
        """
        store, task = self._require_store(), self._require_task()
        examples = task.train_examples() if examples is None else examples
        n = len(examples)
        ids = np.fromiter((task.example_id(examples[i], i) for i in range(n)), dtype=np.int64, count=n)
        _check_unique(ids, name)
        factors = (
            adam_factors(self.model, self.layers, self.spec, optimizer_state, step=adam_step, eps=adam_eps)
            if optimizer_state is not None
            else None
        )
        info = CheckpointInfo(
            name=name,
            lr=float(lr),
            step=step,
            weights_path=str(weights_path) if weights_path is not None else None,
            weights_sha256=file_sha256(weights_path) if weights_path is not None else None,
            optimizer_path=str(optimizer_state) if isinstance(optimizer_state, (str, Path)) else None,
            adam=factors is not None,
        )
        if self.process_rank == 0:
            store.begin_checkpoint(info, factors)
            store.pass_segment(name, n)
        self._barrier()
        if self.process_rank != 0:
            store.begin_checkpoint(info, factors)  # validates against what rank 0 created
        segment = store.pass_segment(name, n)
        counts = segment.committed_counts()
        chunk_rows = store.chunk_rows
        for chunk in np.flatnonzero(counts):
            start = int(chunk) * chunk_rows
            if not np.array_equal(segment.chunk_ids(int(chunk))[: counts[chunk]], ids[start : start + counts[chunk]]):
                raise store_mismatch(name, int(chunk))
        todo = [k for k in range(segment.n_chunks) if k % self.world_size == self.process_rank and counts[k] == 0]
        positions = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in todo]) if todo else np.zeros(0, np.int64)
        chunks = iter(todo)
        buffer: ChunkBuffer | None = None
        bar = tqdm(total=len(positions), desc=f"logging {name}", unit="ex", disable=not self.progress or self.process_rank != 0)
        try:
            with self.adam_correction(factors):
                for lo in range(0, len(positions), batch_size):
                    batch_positions = positions[lo : lo + batch_size]
                    batch_ids = ids[batch_positions]
                    grads = self._to_storage(self.project([examples[int(p)] for p in batch_positions]), batch_ids)
                    taken = 0
                    while taken < len(batch_ids):
                        if buffer is None or buffer.rows == 0:
                            chunk = next(chunks)
                            buffer = ChunkBuffer(segment, chunk, min(chunk_rows, n - chunk * chunk_rows), store.dim, store.dtype, self._writer)
                        taken += buffer.add(batch_ids[taken:], grads[taken:])
                    bar.update(len(batch_ids))
        finally:
            bar.close()
            self._writer.flush()
        self._barrier()
        return len(positions)

    def _to_storage(self, grads: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        """Check rows are finite (also after rounding to the store's dtype) and bring them to the host."""
        bad = ~torch.isfinite(grads).all(dim=1)
        if bad.any():
            bad_ids = ids[bad.cpu().numpy()].tolist()
            raise NonFiniteGradientError(f"non-finite (NaN/Inf) gradients for example ids {bad_ids[:20]}", bad_ids)
        with np.errstate(over="ignore"):  # overflow is reported below with the example ids
            host = grads.detach().cpu().numpy().astype(self._require_store().dtype)
        overflow = ~np.isfinite(host).all(axis=1)
        if overflow.any():
            bad_ids = ids[overflow].tolist()
            raise NonFiniteGradientError(
                f"gradients of example ids {bad_ids[:20]} overflow float16; create the store with dtype='float32'", bad_ids
            )
        return host

    # -- in-training capture ---------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(
        self,
        checkpoint: str,
        lr: float,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        step: int | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        scaler: Any | None = None,
        loss_scale: float = 1.0,
    ) -> Iterator[None]:
        """Log the examples of one training step, at the weights of that step, as a by-product of its backward.

        Wrap the ``backward()`` call (the forward may come before). The backward'd loss must be the
        per-example losses reduced by ``reduction`` over this batch (times ``loss_scale``, e.g. ``1/accumulation``);
        a ``torch.amp.GradScaler`` passed as ``scaler`` has its scale removed. Ids already committed for
        ``checkpoint`` by an earlier session are skipped (resume); an id seen twice in this session is an error.
        The checkpoint's ``lr`` is fixed by its first capture.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        batch_ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        sink = self._capture_sink(checkpoint, lr, step)
        with self._state.armed(len(batch_ids), self.device):
            yield
        grads = self._state.disarm()
        factor = loss_scale * (1.0 / len(batch_ids) if reduction == "mean" else 1.0)
        if scaler is not None and scaler.is_enabled():
            factor *= float(scaler.get_scale())
            if not torch.isfinite(grads).all():
                return  # the scaler skips this step; so do we, and the examples are logged when retried
        grads = grads / factor
        keep = np.array([int(i) not in self._capture_done[checkpoint] for i in batch_ids], dtype=bool)
        seen = self._capture_seen[checkpoint]
        repeated = [int(i) for i in batch_ids[keep] if int(i) in seen]
        if repeated or len(set(batch_ids[keep].tolist())) != int(keep.sum()):
            raise DuplicateIdError(f"example ids logged twice for checkpoint {checkpoint!r}: {repeated[:10] or 'within one batch'}")
        if not keep.any():
            return
        rows = self._to_storage(grads[torch.from_numpy(keep).to(grads.device)], batch_ids[keep])
        seen.update(batch_ids[keep].tolist())
        sink.append(batch_ids[keep], rows)

    def _capture_sink(self, checkpoint: str, lr: float, step: int | None) -> AppendWriter:
        if checkpoint in self._sinks:
            info = self.store.checkpoint_info(checkpoint)  # type: ignore[union-attr]
            if info.lr != float(lr):
                raise ValueError(
                    f"checkpoint {checkpoint!r} was started with lr={info.lr}; a capture passed lr={lr}. "
                    "Use the checkpoint's nominal learning rate (per-step rates are not stored)"
                )
            return self._sinks[checkpoint]
        store = self._require_store()
        for other in self._sinks.values():
            other.flush()  # a new checkpoint: commit the last one's partial chunk
        info = CheckpointInfo(name=checkpoint, lr=float(lr), step=step)
        if self.process_rank == 0:
            store.begin_checkpoint(info)
        self._barrier()
        if self.process_rank != 0:
            store.begin_checkpoint(info)
        self._capture_done[checkpoint] = set(store.committed_ids(checkpoint).tolist())
        self._capture_seen[checkpoint] = set()
        self._sinks[checkpoint] = AppendWriter(store, checkpoint, f"r{self.process_rank}", self._writer)
        return self._sinks[checkpoint]

    # -- lifecycle -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit everything captured so far (including partly filled chunks) and wait for the writes."""
        for sink in self._sinks.values():
            sink.flush()
        self._writer.flush()

    def close(self) -> None:
        """Flush, stop the writer thread and remove every hook."""
        try:
            self.flush()
        finally:
            self._writer.close()
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block do no projection work (e.g. steps you will not capture)."""
        self._state.paused = True
        try:
            yield
        finally:
            self._state.paused = False

    def __enter__(self) -> "GradientLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_losses(values: torch.Tensor, batch_size: int) -> None:
    if not isinstance(values, torch.Tensor) or values.shape != (batch_size,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise TaskError(
            f"Task.loss/measurement must return one value per example, shape ({batch_size},); got {shape}. "
            "Use reduction='none' and sum over each example's tokens"
        )


def _check_unique(ids: np.ndarray, checkpoint: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DuplicateIdError(
            f"Task.example_id gives the same id to several examples of checkpoint {checkpoint!r}: {unique[counts > 1][:10].tolist()}"
        )


def store_mismatch(checkpoint: str, chunk: int) -> Exception:
    from gradstore.store import CheckpointMismatchError

    return CheckpointMismatchError(
        f"checkpoint {checkpoint!r}: the examples differ from those of the interrupted run (chunk {chunk}); "
        "resume with the same examples in the same order, or use a new checkpoint name"
    )


def _warn_on_shared_weights(layers: list) -> None:
    seen: dict[int, str] = {}
    for layer in layers:
        key = id(layer.module.weight)
        if key in seen:
            warnings.warn(
                f"layers {seen[key]!r} and {layer.name!r} share a weight; each is projected separately, so their "
                "cross terms are not in the inner product. Select only one of them for exact TracIn.",
                stacklevel=3,
            )
        seen[key] = layer.name
