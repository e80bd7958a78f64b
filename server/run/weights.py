"""A checkpoint's weights file, checked against the sha256 it was logged with each time it is loaded.

Hashing a weights file costs about a second per GB, so a file is re-hashed only when its ``stat`` changes (a
replaced or rewritten file gets a new inode, size, mtime or ctime); loading it again unchanged costs one ``stat``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gradstore.projection import GradstoreError
from gradstore.store import CheckpointMismatchError, CheckpointNotFoundError, file_sha256

if TYPE_CHECKING:
    import torch

    from gradstore.logger import Task


def _stat_key(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class WeightsFile:
    """The weights file of checkpoint ``checkpoint``; ``sha256``: the one it was logged with (None: none was
    recorded, so the file as it is when this object is made is the reference). Refuses a file that differs."""

    def __init__(self, checkpoint: str, path: str | Path, sha256: str | None, rows: object | None = None):
        self.checkpoint, self.path = checkpoint, Path(path)
        self.rows = rows  # the checkpoint's folder in the store (what to delete to log it again with new weights)
        self.recorded = sha256 is not None
        digest, key = self._hash()
        self.sha256 = sha256 if sha256 is not None else digest
        self._verified: tuple[int, ...] | None = None
        self._check(digest, key)

    def _hash(self) -> tuple[str, tuple[int, ...]]:
        """``(sha256, stat)``; the stat is taken first, so a write while hashing shows as a change next time."""
        try:
            key = _stat_key(self.path)
            return file_sha256(self.path), key
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"weights file {self.path} of checkpoint {self.checkpoint!r} does not exist"
            ) from None

    def _check(self, digest: str, key: tuple[int, ...]) -> None:
        if digest != self.sha256:
            reference = "the one it was logged with" if self.recorded else "the one loaded when the engine started"
            relog = (
                f"delete {self.rows} and run `gradstore index --config ...` to log it again with the new weights"
                if self.rows is not None
                else "log the checkpoint again with the new weights and rebuild the index (`gradstore index --config "
                "...`)"
            )
            raise CheckpointMismatchError(
                f"weights file {self.path} of checkpoint {self.checkpoint!r} differs from {reference} (sha256 "
                f"mismatch); query gradients must come from those weights: restore the file, or {relog}"
            )
        self._verified = key

    def verify(self) -> Path:
        """The path, once its bytes are known to be the reference ones (re-hashed only when its stat changed)."""
        try:
            if _stat_key(self.path) == self._verified:
                return self.path
        except FileNotFoundError:
            pass  # _hash says so
        self._verified = None
        self._check(*self._hash())
        return self.path

    def recheck(self) -> None:
        """Hash the file again whatever its ``stat`` says (a content change that kept its timestamps)."""
        self._verified = None
        self._check(*self._hash())

    def load_into(self, task: Task, model: torch.nn.Module) -> None:
        """``task.load_checkpoint(model, path)`` of the verified file; a file the Task cannot read (truncated,
        not a state dict, other keys) is a CheckpointMismatchError naming it, not the loader's own exception."""
        path = self.verify()
        try:
            task.load_checkpoint(model, path)
        except GradstoreError:
            raise
        except Exception as exc:  # the Task's loader: torch.load, load_state_dict, or the user's own code
            raise CheckpointMismatchError(
                f"weights file {path} of checkpoint {self.checkpoint!r} could not be loaded into the Task's model "
                f"({type(exc).__name__}: {exc}); restore the file the checkpoint was logged with"
            ) from exc
        self.verify()  # unchanged while it was read (a stat, unless it changed)
