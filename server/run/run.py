"""What the CLI and the server do with a run config: the offline indexing job, describing the run, and
opening a query engine."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gradstore.logger import GradientLogger
from gradstore.projection import GradstoreError
from gradstore.store import (
    CheckpointMismatchError,
    GradientIndex,
    GradientStore,
    IndexMismatchError,
    StoreLockedError,
    StoreNotFoundError,
    file_sha256,
    index_lock,
)
from gradstore.store.index import default_index_path
from gradstore.store.remote import as_path

from .config import CheckpointConfig, RunConfig
from .engine import QueryEngine, run_info
from .schemas import RunInfo

__all__ = [
    "describe_run",
    "eval_store_path",
    "index_run",
    "open_engine",
    "open_index",
    "query_device",
    "serving_threads",
]


def eval_store_path(config: RunConfig) -> Path:
    """``[store] eval_path``, else ``<store stem>.eval.zarr`` beside the store."""
    store = config.store.path
    return config.store.eval_path or store.with_name(store.stem + ".eval" + (store.suffix or ".zarr"))


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
def _index_lock(config: RunConfig, rank: int, world: int, wait_s: float) -> Iterator[None]:
    """Rank 0 holds the store's index lock for the block; under torchrun every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(index_lock(config.store.path, wait_s))
            except StoreLockedError as exc:
                refused = str(exc)
        if world > 1:
            message = [refused]
            torch.distributed.broadcast_object_list(message, src=0)
            refused = message[0]
        if refused is not None:
            raise StoreLockedError(refused)
        yield


def index_run(
    config: RunConfig, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False
) -> GradientIndex | None:
    """Log every training example at every checkpoint (resumable; only the ids a checkpoint lacks), then update the
    index (:meth:`GradientIndex.update`: new rows appended, unchanged parts reused), or build it when there is none
    or ``rebuild`` (rank 0 only). The returned index's ``changes`` says what was logged and done.

    Under ``torchrun`` each rank logs the chunks it owns. When the index uses a curvature
    preconditioner and the Task has ``eval_examples``, those are logged into the eval store for ``R_eval``.
    Checkpoints captured during training are not logged again: their weights and lr are checked against the
    config. One index job per store at a time: another one waits ``wait_s`` seconds for its lock, then fails
    (:class:`~gradstore.store.StoreLockedError`, naming the holder).
    """
    rank, world, device = _init_distributed()
    with _index_lock(config, rank, world, wait_s):
        return _index_run(config, progress, rank, world, device, rebuild)


def _index_run(
    config: RunConfig, progress: bool, rank: int, world: int, device: torch.device, rebuild: bool = False
) -> GradientIndex | None:
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
    eval_examples = task.eval_examples() if config.index.preconditioner != "identity" else None
    eval_logger = None
    if eval_examples:
        eval_model = copy.deepcopy(model)
        eval_logger = GradientLogger(
            eval_model,
            task,
            store=eval_store_path(config),
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
    store = GradientStore.open(config.store.path)
    eval_store = GradientStore.open(eval_store_path(config)) if eval_logger is not None else None
    checkpoints = [c.name for c in config.checkpoints]
    index_path = as_path(config.index_path) if config.index_path is not None else default_index_path(config.store.path)
    if not rebuild and (index_path / "manifest.json").is_file():
        index = GradientIndex.update(
            index_path, store, eval_store, checkpoints=checkpoints, options=config.index, progress=progress
        )
    else:
        index = GradientIndex.build(
            store, config.index, path=index_path, checkpoints=checkpoints, eval_store=eval_store, progress=progress
        )
    if index.changes is not None:
        index.changes = index.changes._replace(logged_rows=logged)
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


def open_index(config: RunConfig, store: GradientStore | None = None, device: str | None = None) -> GradientIndex:
    """Load the run's index, checked against its store and the config's index options."""
    store = store or GradientStore.open(config.store.path)
    check_config(config, store)
    eval_path = eval_store_path(config)
    use_eval = config.index.preconditioner != "identity" and (eval_path / "zarr.json").exists()
    eval_store = GradientStore.open(eval_path) if use_eval else None
    index = GradientIndex.open(config.index_path, store, options=config.index, eval_store=eval_store, device=device)
    configured = [c.name for c in config.checkpoints]
    if index.checkpoints != configured:
        raise IndexMismatchError(
            f"index {index.path} covers checkpoints {index.checkpoints}, the config lists {configured}; "
            "run `gradstore index --config ...` to rebuild it"
        )
    return index


def query_device(config: RunConfig) -> str:
    """Where the run's query gradients are computed: ``[query] device``, else cuda when available, else cpu."""
    return str(torch.device(config.query.device or ("cuda" if torch.cuda.is_available() else "cpu")))


def describe_run(config: RunConfig) -> RunInfo:
    """The run's :class:`RunInfo`, as ``GET /v1/run`` serves it, also when the store is missing or the index is
    unusable (``store_status`` or ``index.reason`` then says why); opens no models. A damaged store raises."""
    try:
        store = GradientStore.open(config.store.path)
    except StoreNotFoundError as exc:  # a damaged store is an error, not a status
        return RunInfo(store=str(config.store.path), store_status=str(exc))
    try:
        index, error = open_index(config, store, device="cpu"), None
    except GradstoreError as exc:
        index, error = None, exc
    return run_info(store, index, index_error=error, residency=config.query.residency, device=query_device(config))


def verify_run(config: RunConfig) -> list[str]:
    """Walk the run's store (every committed chunk against its checksum, every record's link), its eval store, the
    checkpoints' weights files (against the sha256 each was logged with), the config (lr and step as stored) and
    its index (every file against the manifest's sizes and checksums, the parts against the store's rows); one line
    per damaged or unusable part, empty when all is intact."""
    problems: list[str] = []
    stores = [config.store.path]
    eval_path = eval_store_path(config)
    if (eval_path / "zarr.json").exists():
        stores.append(eval_path)
    for path in stores:
        try:
            problems += GradientStore.open(path).verify()
        except GradstoreError as exc:
            problems.append(str(exc))
    try:
        store = GradientStore.open(config.store.path)
        problems += weights_problems(config, store)
        problems += config_problems(config, store)
    except GradstoreError:
        pass  # the store's own lines say why it cannot be opened
    try:
        index = open_index(config, device="cpu")
        problems += index.content_problems()
    except GradstoreError as exc:
        problems.append(str(exc))
    return list(dict.fromkeys(problems))


def weights_problems(config: RunConfig, store: GradientStore) -> list[str]:
    """One line per checkpoint whose weights file is missing or differs from the sha256 the store records for it
    (a query's gradients would come from other weights than the rows were logged with)."""
    lines = []
    for ckpt in config.checkpoints:
        if ckpt.name not in store.checkpoints:
            continue  # not logged: the index's lines say so
        recorded = store.checkpoint_info(ckpt.name).weights_sha256
        relog = (
            f"restore the file, or delete {store.path / 'checkpoints' / ckpt.name} and run `gradstore index` to log "
            "the checkpoint again with these weights"
        )
        if not Path(ckpt.path).is_file():
            lines.append(f"weights file {ckpt.path} of checkpoint {ckpt.name!r} is missing; {relog}")
        elif recorded is not None and file_sha256(ckpt.path) != recorded:
            lines.append(
                f"weights file {ckpt.path} of checkpoint {ckpt.name!r} differs from the one its rows were logged with "
                f"(sha256 {recorded[:16]}...); {relog}"
            )
    return lines


def config_problems(config: RunConfig, store: GradientStore) -> list[str]:
    """One line per ``[[checkpoints]]`` entry whose lr or step differs from the store's record of that checkpoint
    (the index weights checkpoints by the stored lr: a changed config would be silently ignored)."""
    lines = []
    for ckpt in config.checkpoints:
        if ckpt.name not in store.checkpoints:
            continue
        info = store.checkpoint_info(ckpt.name)
        where = f"checkpoint {ckpt.name!r} in {config.path}"
        if info.lr != ckpt.lr:
            lines.append(
                f"{where} gives lr={ckpt.lr!r}, its rows were logged with lr={info.lr!r}; set lr = {info.lr!r}, or "
                f"delete {store.path / 'checkpoints' / ckpt.name} and run `gradstore index` to log it with the new lr"
            )
        if ckpt.step is not None and info.step is not None and ckpt.step != info.step:
            lines.append(
                f"{where} gives step={ckpt.step}, its rows were logged at step={info.step}; set step = {info.step}, "
                f"or delete {store.path / 'checkpoints' / ckpt.name} and run `gradstore index` to log it again"
            )
    return lines


def check_config(config: RunConfig, store: GradientStore) -> None:
    """Refuse a config whose checkpoints' lr or step differ from the store's (:func:`config_problems`)."""
    problems = config_problems(config, store)
    if problems:
        raise CheckpointMismatchError("; ".join(problems))


def serving_threads(config: RunConfig) -> int:
    """Torch intra-op threads for a process that serves queries: 1 when they run on CPU, unless
    ``OMP_NUM_THREADS`` says otherwise. Returns the setting now in force (it is process-wide).

    A query's work is many small ops (a few examples' gradients, one scan of the index); an OpenMP team per
    op buys nothing there, and its threads spin after every op, competing for the cores with the event
    loop and with the other requests being served (each worker thread would start its own team).
    """
    if torch.device(query_device(config)).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def open_engine(config: RunConfig, device: str | None = None) -> QueryEngine:
    """Task, store, index and checkpoint models of a run, ready to answer queries."""
    store = GradientStore.open(config.store.path)
    device = device or config.query.device
    index = open_index(config, store, device=device)
    return QueryEngine(
        config.make_task(),
        store,
        index,
        {c.name: c.path for c in config.checkpoints},
        residency=config.query.residency,
        device=device,
        batch_size=config.query.batch_size,
    )
