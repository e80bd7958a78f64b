"""The offline indexing job (``gradstore index``): log every training example at every checkpoint a store lacks,
then build or update the run's index. Under ``torchrun`` each rank logs the chunks it owns; rank 0 holds the store's
index lock and writes the index."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from gradstore.logger import GradientLogger
from gradstore.store import (
    CheckpointMismatchError,
    GradientIndex,
    GradientStore,
    StoreLockedError,
    UpdateSummary,
    build_index,
    file_sha256,
    index_lock,
    update_index,
)
from gradstore.store.remote import as_path, local_index_dir

from .config import CheckpointConfig, RunConfig

if TYPE_CHECKING:
    from .run import Run

__all__ = ["index_job", "stored_layout"]


@overload
def index_job(
    run: Run, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, load: Literal[True] = True
) -> GradientIndex | None: ...
@overload
def index_job(
    run: Run, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, *, load: Literal[False]
) -> UpdateSummary | None: ...
@overload
def index_job(
    run: Run, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, load: bool = True
) -> GradientIndex | UpdateSummary | None: ...
def index_job(
    run: Run, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, load: bool = True
) -> GradientIndex | UpdateSummary | None:
    """Log every training example at every checkpoint (resumable; only the ids a checkpoint lacks), then update the
    index (:func:`~gradstore.store.update_index`: new rows appended, unchanged parts reused), or build it when there is
    none or ``rebuild`` (:func:`~gradstore.store.build_index`; rank 0 only). Returns the index loaded, its ``changes``
    saying what was logged and done; with ``load=False`` only that :class:`~gradstore.store.UpdateSummary`, without
    paying the index's load (a resident flat index is read whole and checked). Other ranks return None.

    Under ``torchrun`` each rank logs the chunks it owns. When the index uses a curvature
    preconditioner and the Task has ``eval_examples``, those are logged into the eval store for ``R_eval``.
    Checkpoints captured during training are not logged again: their weights and lr are checked against the
    config. One index job per store at a time: another one waits ``wait_s`` seconds for its lock, then fails
    (:class:`~gradstore.store.StoreLockedError`, naming the holder).
    """
    rank, world, device = _init_distributed()
    with _index_lock(run, rank, world, wait_s):
        return _index_run(run, progress, rank, world, device, rebuild, load)


def _init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world, device


@contextlib.contextmanager
def _index_lock(run: Run, rank: int, world: int, wait_s: float) -> Iterator[None]:
    """Rank 0 holds the store's index lock for the block; under torchrun every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(index_lock(run.store_path, wait_s))
            except StoreLockedError as exc:
                refused = str(exc)
        if world > 1:
            message = [refused]
            torch.distributed.broadcast_object_list(message, src=0)
            refused = message[0]
        if refused is not None:
            raise StoreLockedError(refused)
        yield


def _index_run(
    run: Run, progress: bool, rank: int, world: int, device: torch.device, rebuild: bool, load: bool
) -> GradientIndex | UpdateSummary | None:
    """Log what the store lacks (every rank), then build or update the index (rank 0), and load it when ``load``."""
    config = run.config
    task = config.make_task()
    model = task.build_model().to(device)
    p = config.projection
    layout = stored_layout(config)
    store_dtype = layout["dtype"]
    logger = GradientLogger(
        model,
        task,
        store=config.store.path,
        rank=p.rank,
        init=p.init,
        layers=p.layers,
        seed=p.seed,
        progress=progress,
        **layout,
    )
    eval_examples = task.eval_examples() if run.wants_eval_store() else None
    eval_logger = None
    if eval_examples:
        eval_model = copy.deepcopy(model)
        eval_logger = GradientLogger(
            eval_model,
            task,
            store=run.eval_store_path,
            spec=logger.spec,
            dtype=store_dtype,
            chunk_rows=config.store.chunk_rows,
            progress=progress,
        )
    logged = 0
    try:
        store = logger.store
        assert store is not None  # the logger was given a store path
        for ckpt in config.checkpoints:
            pass_args = functools.partial(
                GradientLogger.log_checkpoint,
                name=ckpt.name,
                lr=ckpt.lr,
                batch_size=config.batch_size,
                step=ckpt.step,
                weights_path=ckpt.path,
                optimizer_state=ckpt.optimizer_state,
                adam_step=ckpt.adam_step,
                adam_eps=ckpt.adam_eps,
            )
            if ckpt.name in store.checkpoints and store.logged_by_capture(ckpt.name):
                _check_captured(store, ckpt, record=rank == 0)
            else:
                task.load_checkpoint(model, ckpt.path)
                logged += pass_args(logger, examples=task.train_examples())
            if eval_logger is not None:
                task.load_checkpoint(eval_logger.model, ckpt.path)
                pass_args(eval_logger, examples=eval_examples)
    finally:
        logger.close()
        if eval_logger is not None:
            eval_logger.close()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    store = run.open_store()
    eval_store = GradientStore.open(run.eval_store_path) if eval_logger is not None else None
    checkpoints = [c.name for c in config.checkpoints]
    index_path = run.index_path
    if not rebuild and (index_path / "manifest.json").is_file():
        summary = update_index(
            index_path, store, eval_store, checkpoints=checkpoints, options=config.index, progress=progress
        )
    else:
        summary = build_index(
            store, config.index, path=index_path, checkpoints=checkpoints, eval_store=eval_store, progress=progress
        )
    summary = summary._replace(logged_rows=logged)
    if not load:
        return summary
    assert summary.path is not None
    index = GradientIndex.open(local_index_dir(summary.path), store, eval_store=eval_store)  # as built, no fetch
    index.changes = summary
    return index


def stored_layout(config: RunConfig) -> dict[str, Any]:
    """``spec``, ``dtype`` and ``chunk_rows`` for the run's logger: those of its existing store where ``run.toml`` does
    not give them (a run over a store written by ``capture()``, the callbacks or an earlier ``index`` needs no
    repetition of them); what the config gives is checked against the store by the logger, as before."""
    layout: dict[str, Any] = {"dtype": config.store.dtype, "chunk_rows": config.store.chunk_rows}
    if not (as_path(config.store.path) / "zarr.json").exists():
        return layout
    store = GradientStore.open(config.store.path)
    given = config.store.model_fields_set
    if "projection" not in config.model_fields_set:
        layout["spec"] = store.spec
    if "dtype" not in given:
        layout["dtype"] = store.dtype
    if "chunk_rows" not in given:
        layout["chunk_rows"] = store.chunk_rows
    return layout


def _check_captured(store: GradientStore, ckpt: CheckpointConfig, record: bool) -> None:
    """A checkpoint captured during training, as the config describes it: same lr and step, the weights it was
    captured with (their sha256 is recorded now if the capture recorded none), no Adam correction it lacks."""
    info = store.checkpoint_info(ckpt.name)
    entry = "its [[checkpoints]] entry in the config"
    if info.lr != ckpt.lr:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.name!r} was captured during training with lr={info.lr!r}, the config gives "
            f"lr={ckpt.lr!r}; set lr = {info.lr!r} in {entry}"
        )
    if ckpt.step is not None and info.step is not None and info.step != ckpt.step:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.name!r} was captured with step={info.step}, the config gives step={ckpt.step}; "
            f"set step = {info.step} in {entry}"
        )
    if ckpt.optimizer_state is not None and not info.adam:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.name!r} was captured without the Adam correction, so its optimizer state cannot be "
            f"applied now; remove the optimizer state from {entry}"
        )
    sha256 = file_sha256(ckpt.path)
    if info.weights_sha256 is None:
        if record:
            store.record_weights(ckpt.name, ckpt.path, sha256)
    elif sha256 != info.weights_sha256:
        raise CheckpointMismatchError(
            f"weights file {ckpt.path} differs from the weights checkpoint {ckpt.name!r} was captured with "
            f"(sha256 {sha256[:16]}..., recorded {info.weights_sha256[:16]}... for {info.weights_path}); give the "
            f"weights its interval started from in {entry}"
        )
