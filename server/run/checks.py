"""What ``gradstore verify`` checks beyond the store's and the index's own files: the run's config and weights files
against what the store recorded when its rows were logged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gradstore.projection import GradstoreError
from gradstore.store import CheckpointMismatchError, GradientStore, file_sha256

from .config import RunConfig

if TYPE_CHECKING:
    from .run import Run

__all__ = ["check_config", "config_problems", "run_problems", "weights_problems"]


def run_problems(run: Run) -> list[str]:
    """Walk the run's store (every committed chunk against its checksum, every record's link), its eval store, the
    checkpoints' weights files (against the sha256 each was logged with), the config (lr and step as stored) and
    its index (every file against the manifest's sizes and checksums, the parts against the store's rows); one line
    per damaged or unusable part, empty when all is intact."""
    config = run.config
    problems: list[str] = []
    stores = [run.store_path]
    if (run.eval_store_path / "zarr.json").exists():
        stores.append(run.eval_store_path)
    for path in stores:
        try:
            problems += GradientStore.open(path).verify()
        except GradstoreError as exc:
            problems.append(str(exc))
    try:
        store = run.open_store()
        problems += weights_problems(config, store)
        problems += config_problems(config, store)
    except GradstoreError:
        pass  # the store's own lines say why it cannot be opened
    try:
        index = run.open_index(device="cpu")
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
