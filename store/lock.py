"""One ``gradstore index`` per store at a time: an exclusive lock beside the store, saying who holds it.

The lock is ``fcntl.flock`` on ``.<store name>.index.lock`` in the store's directory, which records the holder's
pid, host and start time. The kernel releases a flock when its process dies, so a lock left by a killed job on this
host is taken over at once; the file's contents are only there to say who holds a live one.

A store at a URL has no flock: its lock is an object created by a conditional create-if-absent PUT and deleted on
release (store/remote.py); one left by a dead process on this host is taken over, one from another host is not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreLockedError
from .remote import RemotePath, StorePath, as_path, remote_lock

POLL_S = 0.1


def lock_path(store_path: str | Path | RemotePath) -> StorePath:
    """Where the index lock of the store at ``store_path`` lives (beside it: it exists before the store does)."""
    store_path = as_path(store_path)
    return store_path.parent / f".{store_path.name}.index.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        since = datetime.fromtimestamp(float(info["started"]), tz=timezone.utc).isoformat(timespec="seconds")
        return f"pid {info['pid']} on host {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


@contextlib.contextmanager
def index_lock(store_path: str | Path | RemotePath, wait_s: float = 0.0) -> Iterator[StorePath]:
    """Hold the index lock of a store for the block; wait up to ``wait_s`` seconds for another holder to finish,
    then raise :class:`StoreLockedError` naming it (pid, host, since when)."""
    path = lock_path(store_path)
    if isinstance(path, RemotePath):
        with remote_lock(path, str(store_path), wait_s) as held:
            yield held
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:g} s)" if wait_s else ""
                    raise StoreLockedError(
                        f"another `gradstore index` is working on store {store_path}: {_holder(path)}{waited}. Wait "
                        f"for it to finish (or pass --wait SECONDS). A lock whose process has died is taken over by "
                        f"itself; if that process ran on another host and is gone, delete {path}"
                    ) from None
                time.sleep(POLL_S)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: nobody holds it (the file stays, so a waiter's flock stays meaningful)
    finally:
        os.close(fd)  # releases the flock
