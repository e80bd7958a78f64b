"""An index's ``manifest.json`` (what it was built from and with), the checks that refuse a mismatched index, and
the build-then-swap that never leaves a half-built index directory behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .durable import fsync_dir, fsync_tree, remove_stale, scratch_dir
from .errors import IndexMismatchError, IndexNotFoundError, StaleIndexError
from .gradient_store import GradientStore
from .index_options import IndexOptions

INDEX_FORMAT_VERSION = 2  # 2: union of ids (missing_rows), self-influence norms taken before normalisation
MANIFEST = "manifest.json"
_JSON_NAMES = {dict: "object", list: "array", str: "string"}
REBUILD_HINT = "rebuild it: `gradstore index --config ...` or GradientIndex.rebuild(path, store)"


@dataclass(frozen=True)
class IndexManifest:
    """What ``manifest.json`` records: the build options, and everything the index is checked against on open."""

    options: IndexOptions
    checkpoints: list[str]
    lrs: list[float]
    dim: int  # D of the store (the index vectors are len(checkpoints) * D wide)
    num_rows: int
    store_fingerprint: str
    projection_fingerprint: str
    eval_store: str | None = None  # path of the eval store whose statistics entered R (curvature preconditioners)
    eval_fingerprint: str | None = None
    missing_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # per checkpoint: {"skipped", "absent"}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # {file: {"bytes", "blake2b"}}, checked on open
    format_version: int = INDEX_FORMAT_VERSION

    def with_files(self, directory: Path) -> IndexManifest:
        """This manifest recording the size and hash of every file built into ``directory`` (but itself)."""
        return replace(self, files={p.name: _digest(p) for p in sorted(directory.iterdir()) if p.name != MANIFEST})

    def check_files(self, directory: Path) -> None:
        """Refuse an index whose files are missing, truncated or changed since it was built."""
        if not self.files:
            raise IndexMismatchError(f"index {directory} records no file checksums; {REBUILD_HINT}")
        for name, recorded in self.files.items():
            path = directory / name
            if not path.is_file():
                raise IndexMismatchError(f"index file {path} is missing; {REBUILD_HINT}")
            if path.stat().st_size != recorded.get("bytes"):
                raise IndexMismatchError(
                    f"index file {path} has {path.stat().st_size} bytes, {recorded.get('bytes')} were written "
                    f"(truncated or replaced); {REBUILD_HINT}"
                )
            if _digest(path)["blake2b"] != recorded.get("blake2b"):
                raise IndexMismatchError(f"index file {path} changed since it was built (checksum); {REBUILD_HINT}")

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, directory: Path) -> IndexManifest:
        """The manifest of the index at ``directory``; a missing, corrupt or other-version one is refused."""
        path = directory / MANIFEST
        if not path.exists():
            raise IndexNotFoundError(
                f"no index at {directory}; build it with `gradstore index --config ...` or GradientIndex.build(store)"
            )
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # truncated or garbled
            raise IndexMismatchError(f"index manifest {path} is not valid JSON ({exc}); {REBUILD_HINT}") from exc
        if not isinstance(data, dict):
            raise IndexMismatchError(
                f"index manifest {path} holds a JSON {type(data).__name__}, not an object; {REBUILD_HINT}"
            )
        version = data.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise IndexMismatchError(
                f"index manifest {path} has format version {version!r}, expected {INDEX_FORMAT_VERSION}; {REBUILD_HINT}"
            )
        known = {f.name for f in fields(IndexOptions)}  # options a newer build may have dropped are ignored
        try:
            for key, kind in (("options", dict), ("checkpoints", list), ("lrs", list), ("store_fingerprint", str)):
                if not isinstance(data.get(key), kind):
                    raise ValueError(f"{key!r} should be a JSON {_JSON_NAMES[kind]}, got {data.get(key)!r}")
            if len(data["lrs"]) != len(data["checkpoints"]):
                raise ValueError(f"{len(data['checkpoints'])} checkpoints but {len(data['lrs'])} lrs")
            return cls(
                options=IndexOptions(**{k: v for k, v in data["options"].items() if k in known}),
                checkpoints=[str(name) for name in data["checkpoints"]],
                lrs=[float(lr) for lr in data["lrs"]],
                dim=int(data["dim"]),
                num_rows=int(data["num_rows"]),
                store_fingerprint=str(data["store_fingerprint"]),
                projection_fingerprint=str(data["projection_fingerprint"]),
                eval_store=data.get("eval_store"),
                eval_fingerprint=data.get("eval_fingerprint"),
                files={str(name): dict(f) for name, f in data.get("files", {}).items()},
                missing_rows={
                    str(name): {"skipped": int(m["skipped"]), "absent": int(m["absent"])}
                    for name, m in data.get("missing_rows", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexMismatchError(f"index manifest {path} is malformed ({exc!r}); {REBUILD_HINT}") from exc

    def check_store(self, directory: Path, store: GradientStore, eval_store: GradientStore | None) -> None:
        """Refuse to serve ``store`` (and ``eval_store``) from an index built for another or an older one."""
        if self.projection_fingerprint != store.spec.fingerprint() or self.dim != store.dim:
            raise IndexMismatchError(f"index {directory} was built for a store with another projection; {REBUILD_HINT}")
        stored_lrs = [store.checkpoint_info(name).lr for name in self.checkpoints if name in store.checkpoints]
        if stored_lrs != self.lrs:
            raise IndexMismatchError(
                f"index {directory} records lrs {self.lrs} for checkpoints {self.checkpoints}, the store has "
                f"{stored_lrs}; {REBUILD_HINT}"
            )
        if self.store_fingerprint != store.fingerprint():
            raise StaleIndexError(
                f"store {store.path} changed after index {directory} was built (it indexed {self.num_rows} rows of "
                f"checkpoints {self.checkpoints}); {REBUILD_HINT}"
            )
        if self.options.preconditioner == "identity":
            return  # R_eval only enters curvature preconditioners
        if (eval_store is None) != (self.eval_fingerprint is None):
            raise IndexMismatchError(
                f"index {directory} was built {'with' if eval_store is None else 'without'} an eval store, "
                f"now {'none is' if eval_store is None else 'one is'} given; {REBUILD_HINT}"
            )
        if eval_store is not None and self.eval_fingerprint != eval_store.fingerprint():
            raise StaleIndexError(
                f"eval store {eval_store.path} changed after index {directory} was built; {REBUILD_HINT}"
            )

    def with_search_options(self, directory: Path, options: IndexOptions | None) -> IndexManifest:
        """This manifest searched with ``options``' search-time knobs; options that need another build are refused."""
        if options is None:
            return self
        built = self.options.build_key()
        diffs = {k: (built[k], v) for k, v in options.build_key().items() if built[k] != v}
        if diffs:
            raise IndexMismatchError(
                f"index {directory} was built with other options {diffs} (built, requested); {REBUILD_HINT}"
            )
        return replace(self, options=options)


@contextlib.contextmanager
def building(path: Path) -> Iterator[Path]:
    """A fresh directory beside ``path`` to build into; it replaces ``path`` when the block succeeds and is removed
    when it fails, so ``path`` never holds a half-built index. What crashed builds left behind is removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, "old")
    tmp = scratch_dir(path, "building")
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the finished directory ``tmp`` (two renames; a reader sees the old or the new index)."""
    if path.exists():
        old = scratch_dir(path, "old")
        os.rename(path, old / "index")
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_dir(path.parent)


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "blake2b": digest.hexdigest()}
