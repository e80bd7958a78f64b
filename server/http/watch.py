"""Live change detection for a running server: the run's files are fingerprinted cheaply (``os.stat`` of the run
config, the index files, the store's metadata and commit records, and the checkpoint weights files) every
``watch_s`` seconds; when the fingerprint changes, the run config is read again and the query engine rebuilt in a
worker thread and swapped in atomically (requests in flight keep the engine they started with), or, when the new
state cannot be served, the API and ``/readyz`` answer 503 with the reason until it can. ``[server]`` settings
(port, limits, key) stay those the server started with.

The store's bulk data (``grads`` and ``ids`` chunk files) is not stat'ed file by file: a chunk is only ever
written together with its commit record and checksum, which are (and whole chunks are verified when read).

A ``stat`` misses bytes that change in place with their timestamps kept (bit rot, a restore that keeps mtimes), so
each check also re-hashes some of the served engine's files (:class:`ContentCheck`: its index files against the
manifest, its checkpoints' weights against their sha256), round-robin, at most :data:`RECHECK_BYTES_PER_S` on
average: a changed file makes the API answer 503 naming it until it is restored (then the engine is reloaded).
Resident data (a flat index within ``resident_mb``, FAISS indexes, ids, preconditioners) is answered from memory
checked once at load; the re-check covers what is read from disk per query.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradstore.projection import GradstoreError
from gradstore.store.manifest import IndexManifest

from ..errors import http_status
from ..run.config import RunConfig
from ..run.run import Run

__all__ = ["RECHECK_BYTES_PER_S", "ContentCheck", "Unavailable", "Watcher", "run_fingerprint"]

logger = logging.getLogger("uvicorn.error")

BULK_ARRAYS = frozenset({"grads", "ids"})  # arrays whose chunk folders are stat'ed as folders only


def _stat(path: str | Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _tree(root: Path, out: list[tuple]) -> None:
    """Stat ``root`` and everything under it, except inside the chunk folders of bulk arrays."""
    out.append(_stat(root))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name == "c" and root.name in BULK_ARRAYS:
                out.append(_stat(entry.path))
            else:
                _tree(Path(entry.path), out)
        else:
            out.append(_stat(entry.path))


def run_fingerprint(config: RunConfig) -> tuple:
    """A value that changes when the run's index, store, eval store or checkpoint files change (stat only)."""
    run = Run(config)
    out: list[tuple] = [_stat(config.path)]
    for tree in (run.index_path, run.store_path):
        if isinstance(tree, Path):  # a remote store or index (s3://...) is not watched: restart to reload it
            _tree(tree, out)
    _tree(run.eval_store_path, out)
    for checkpoint in config.checkpoints:
        out.append(_stat(checkpoint.path))
        if checkpoint.optimizer:
            out.append(_stat(checkpoint.optimizer))
    return tuple(out)


RECHECK_BYTES_PER_S = 64 << 20  # content re-check budget: ~6% of a core hashing blake2b / sha256


class ContentCheck:
    """Re-hashes the served engine's files a few at a time: each :meth:`step` hashes files while its byte credit
    (``rate`` per second since the last step) lasts, at least one and each at most once, so every file is checked
    once per ``total bytes / rate`` seconds, or once per step when the run is smaller than a step's credit (a
    small run is not hashed over and over within one step)."""

    def __init__(self, rate: float = RECHECK_BYTES_PER_S):
        self.rate, self.credit, self.last = rate, 0.0, time.monotonic()
        self.engine: Any = None
        self.cursor = 0
        self.passed = 0  # files that passed in a row (a whole round after a failure: it was repaired)

    def clean_round(self, engine: Any) -> bool:
        """Whether every file of ``engine`` passed since the last failure."""
        return self.passed >= max(1, len(self._items(engine)))

    def step(self, engine: Any) -> None:
        """Hash the next files; a changed one raises the engine's typed error (naming it)."""
        if engine is not self.engine:
            self.engine, self.cursor, self.passed = engine, 0, 0
        now = time.monotonic()
        self.credit = min(self.credit + (now - self.last) * self.rate, self.rate * 10)
        self.last = now
        items = self._items(engine)
        hashed = 0
        while hashed < len(items) and (self.credit > 0 or not hashed):
            size, check = items[self.cursor % len(items)]
            self.cursor = (self.cursor + 1) % len(items)
            self.credit -= size
            hashed += 1
            try:
                check()
            except Exception:
                self.passed = 0
                raise
            self.passed += 1

    @staticmethod
    def _items(engine: Any) -> list[tuple[int, Callable[[], None]]]:
        """``(bytes, check)`` of each served file: the index's files (while the manifest on disk is the one the
        engine loaded: after a swap the stat watch reloads) and the weights files."""
        items: list[tuple[int, Callable[[], None]]] = []
        index = getattr(engine, "index", None)
        manifest = getattr(index, "manifest", None)
        if index is not None and isinstance(manifest, IndexManifest) and isinstance(index.path, Path):
            try:
                current = IndexManifest.read(index.path).files
            except GradstoreError:
                current = None  # the stat watch sees the manifest change
            if current == manifest.files:
                for name, recorded in sorted(manifest.files.items()):
                    items.append(
                        (int(recorded.get("bytes", 0)), functools.partial(manifest.check_file, index.path, name))
                    )
        for weights_file in getattr(engine, "weights_files", {}).values():
            if hasattr(weights_file, "recheck"):
                items.append((_size(weights_file.path), weights_file.recheck))
        return items


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class Unavailable:
    """Why the run cannot be served now: the status and message every API request and ``/readyz`` answer."""

    def __init__(self, error: BaseException):
        self.status = http_status(error) if isinstance(error, GradstoreError) else 503
        if self.status < 500:
            self.status = 503  # the run, not the request, is what is wrong
        if isinstance(error, GradstoreError):
            self.message = str(error)
        elif isinstance(error, OSError):  # a run file removed or unreadable under a running server
            self.message = (
                f"{type(error).__name__}: {error}; a file of the run changed or disappeared while serving: restore it, "
                "or rebuild the index with `gradstore index --config ...`"
            )
        else:
            self.message = f"{type(error).__name__}: {error}"


def _reread(config: RunConfig) -> RunConfig:
    """The run config as its file says now (one built in memory, without a file, as it is); ``[server]`` stays the
    one the server started with (its port, limits, key and engine, ``--ray`` included)."""
    if not config.path.is_file():
        return config
    fresh = RunConfig.load(config.path, hf_output=config.hf.output if config.hf is not None else None)
    return fresh.model_copy(update={"server": config.server})


class Watcher:
    """The background task that keeps ``app.state.engine`` in step with the run's files."""

    def __init__(self, app: Any, config: RunConfig, interval_s: float, fingerprint: tuple | None = None):
        self.app, self.config, self.interval_s = app, config, interval_s
        self.fingerprint = fingerprint if fingerprint is not None else run_fingerprint(config)
        self.reloads = 0
        self.content = ContentCheck()
        self.content_damage: str | None = None  # why the served files fail their re-check, until repaired

    async def run(self) -> None:
        """Check every ``interval_s``; reload on a change. Runs until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:  # the watch must outlive any one failed check
                logger.warning("watch: check failed: %r", exc)

    async def check(self) -> bool:
        """Reload if the run's files changed since the last check; returns whether they had."""
        now = await asyncio.to_thread(run_fingerprint, self.config)
        if now == self.fingerprint:
            await self.recheck_content()
            return False
        self.fingerprint = now
        await self.reload()
        return True

    async def recheck_content(self) -> None:
        """Re-hash the next few served files (:class:`ContentCheck`); a changed one makes the run unavailable
        (503 naming it); once every file passes again, reload."""
        engine = getattr(self.app.state, "engine", None)
        if engine is None:
            return
        try:
            await asyncio.to_thread(self.content.step, engine)
        except Exception as exc:
            self.app.state.unavailable = Unavailable(exc)
            self.content_damage = self.app.state.unavailable.message
            logger.warning("watch: a served file changed in place: %s", self.content_damage)
            return
        if self.content_damage is not None and self.content.clean_round(engine):
            self.content_damage = None
            await self.reload()

    def _load(self) -> tuple[RunConfig, Any]:
        config = _reread(self.config)
        return config, Run(config).open_serving_engine()

    async def reload(self) -> None:
        """Build a new engine from the run's files and swap it in, or record why the run cannot be served."""
        try:
            config, engine = await asyncio.to_thread(self._load)
        except Exception as exc:
            self.app.state.unavailable = Unavailable(exc)
            logger.warning(
                "watch: the run's files changed and cannot be served: %s", self.app.state.unavailable.message
            )
            return
        self.config = config
        self.content_damage = None
        self.app.state.engine, self.app.state.unavailable = engine, None
        self.reloads += 1
        logger.info("watch: the run's files changed; reloaded the query engine")
