"""Durable directory builds: write aside, fsync, rename into place; clean up what crashed builds left.

A store or index is built in a hidden sibling directory named ``.<name>.<purpose>-<host>-<pid>-<random>``, flushed to
disk (fsync of every file and directory, so a power loss cannot reorder the rename before the data), then renamed
over the target in one step. A crashed build leaves only such a sibling, which the next build removes once the
process that made it is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

_HOST = socket.gethostname().replace("-", "_")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def scratch_dir(target: Path, purpose: str) -> Path:
    """A new hidden sibling of ``target`` to build into (stale ones of the same purpose are removed first)."""
    remove_stale(target, purpose)
    path = target.parent / f".{target.name}.{purpose}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def remove_stale(target: Path, purpose: str) -> list[Path]:
    """Remove siblings a crashed build of ``target`` left behind: those made on this host by a dead process."""
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.glob(f".{target.name}.{purpose}-*"):
        parts = candidate.name.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rename_into_place(built: Path, target: Path) -> bool:
    """Atomically move a finished build to ``target`` if nothing is there yet (or an empty directory).

    Returns False (and removes the build) when another process got there first.
    """
    fsync_tree(built)
    try:
        os.rename(built, target)
    except OSError:
        if target.exists() and any(target.iterdir()):
            shutil.rmtree(built, ignore_errors=True)
            return False
        raise
    fsync_dir(target.parent)
    return True
