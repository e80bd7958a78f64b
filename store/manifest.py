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
from .errors import IndexMismatchError, IndexNotFoundError, StaleIndexError, StoreCorruptError
from .gradient_store import GradientStore
from .index_options import IndexOptions, SearchOptions

# 2: union of ids (missing_rows), self-influence norms taken before normalisation
# 3: rows in row parts (appended by updates), flat vectors one file per checkpoint and row part in the store's dtype,
#    one preconditioner file per checkpoint with the store state it was fitted on
INDEX_FORMAT_VERSION = 3
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
    # [[start, stop]] of each row part: the rows of a build, then those each update appended
    row_parts: list[list[int]] = field(default_factory=list)
    # one per checkpoint and row part: {"checkpoint", "row_part", "rows": [start, stop], "ids_blake2b", "present"
    # (rows with a stored vector there), "file" (flat) or None, "dtype", "fitted_rows"}
    parts: list[dict[str, Any]] = field(default_factory=list)
    # per checkpoint: {"fingerprint" (its rows in the store), "rows", "fitted_rows", "preconditioner_file"}
    checkpoint_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    store_content: str | None = None  # GradientStore.content_fingerprint() (None: built before it was recorded)
    # one per shard (options.shards > 1): {"shard", "rows": [start, stop], "dir": its files' folder ("" for flat,
    # whose shards are its row parts)}; empty: one unsharded index. An update appends one for its new rows
    shards: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = INDEX_FORMAT_VERSION

    def part(self, checkpoint: str, row_part: int) -> dict[str, Any]:
        """The manifest entry of ``checkpoint``'s part of row part ``row_part``."""
        for entry in self.parts:
            if entry["checkpoint"] == checkpoint and entry["row_part"] == row_part:
                return entry
        raise IndexMismatchError(f"index manifest lists no part of checkpoint {checkpoint!r} rows {row_part}")

    def shard_view(self, shard: int) -> IndexManifest:
        """The manifest of shard ``shard`` as a unit of its own: its rows numbered from 0, its row parts and parts,
        and (FAISS kinds) its files named relative to its folder; what a backend loads one shard with."""
        entry = self.shards[shard]
        start, stop = entry["rows"]
        prefix = entry["dir"] + "/" if entry["dir"] else ""
        inside = [r for r, (lo, hi) in enumerate(self.row_parts) if start <= lo and hi <= stop]
        return replace(
            self,
            num_rows=stop - start,
            row_parts=[[lo - start, hi - start] for lo, hi in (self.row_parts[r] for r in inside)],
            parts=[
                {**p, "row_part": inside.index(p["row_part"]), "rows": [p["rows"][0] - start, p["rows"][1] - start]}
                for p in self.parts
                if p["row_part"] in inside
            ],
            files={name[len(prefix) :]: f for name, f in self.files.items() if name.startswith(prefix)},
            shards=[],
        )

    def with_files(self, directory: Path) -> IndexManifest:
        """This manifest recording the size and hash of every file built into ``directory`` (but itself)."""
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
        return replace(self, files={p.relative_to(directory).as_posix(): _digest(p) for p in files})

    def check_files(
        self, directory: Path, label: Path | None = None, skip: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """Refuse an index whose files are missing, truncated or changed since it was built (``label``: the path
        messages name, when ``directory`` is another way to reach it; ``skip``: files whose loader checks the very
        bytes it reads, :meth:`verified_bytes`, so they are not hashed twice)."""
        shown = label if label is not None else directory
        if not self.files:
            raise IndexMismatchError(f"index {shown} records no file checksums; {REBUILD_HINT}")
        for name, recorded in self.files.items():
            path, named = directory / name, shown / name
            if name in skip and path.is_file() and path.stat().st_size == recorded.get("bytes"):
                continue
            if not path.is_file():
                raise IndexMismatchError(f"index file {named} is missing; {REBUILD_HINT}")
            if path.stat().st_size != recorded.get("bytes"):
                raise IndexMismatchError(
                    f"index file {named} has {path.stat().st_size} bytes, {recorded.get('bytes')} were written "
                    f"(truncated or replaced); {REBUILD_HINT}"
                )
            if _digest(path)["blake2b"] != recorded.get("blake2b"):
                raise IndexMismatchError(f"index file {named} changed since it was built (checksum); {REBUILD_HINT}")

    def check_bytes(self, name: str, data: bytes | bytearray, shown: Path) -> None:
        """Refuse ``data`` as the bytes of index file ``name`` unless they are the ones it was built with."""
        recorded = self.files.get(name)
        if recorded is None:
            raise IndexMismatchError(f"index file {shown / name} is not recorded in its manifest; {REBUILD_HINT}")
        if len(data) != recorded.get("bytes"):
            raise IndexMismatchError(
                f"index file {shown / name} has {len(data)} bytes, {recorded.get('bytes')} were written (truncated or "
                f"replaced); {REBUILD_HINT}"
            )
        if hashlib.blake2b(data, digest_size=16).hexdigest() != recorded.get("blake2b"):
            raise IndexMismatchError(f"index file {shown / name} changed since it was built (checksum); {REBUILD_HINT}")

    def verified_bytes(self, directory: Path, name: str, label: Path | None = None) -> bytes:
        """The bytes of index file ``name``, read once and checked against the manifest: what is loaded is what was
        verified (no window between a check and a second read)."""
        data = (directory / name).read_bytes()
        self.check_bytes(name, data, label if label is not None else directory)
        return data

    def check_file(self, directory: Path, name: str, label: Path | None = None) -> None:
        """Refuse index file ``name`` unless its bytes on disk now are those it was built with (a re-check)."""
        path = directory / name
        if not path.is_file():
            raise IndexMismatchError(f"index file {(label or directory) / name} is missing; {REBUILD_HINT}")
        recorded = self.files.get(name, {})
        try:
            found = _digest(path)
        except OSError as exc:  # removed or unreadable between the check above and the read
            raise IndexMismatchError(
                f"index file {(label or directory) / name} cannot be read ({exc}); {REBUILD_HINT}"
            ) from exc
        if found != {"bytes": recorded.get("bytes"), "blake2b": recorded.get("blake2b")}:
            shown = (label or directory) / name
            raise IndexMismatchError(f"index file {shown} changed since it was built (checksum); {REBUILD_HINT}")

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, directory: Path, label: Path | None = None) -> IndexManifest:
        """The manifest of the index at ``directory``; a missing, corrupt or other-version one is refused
        (``label``: the path messages name, when ``directory`` is another way to reach it)."""
        source = directory / MANIFEST
        path = label / MANIFEST if label is not None else source
        directory = label if label is not None else directory
        if not source.exists():
            raise IndexNotFoundError(
                f"no index at {directory}; build it with `gradstore index --config ...` or GradientIndex.build(store)"
            )
        try:
            data = json.loads(source.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # truncated or garbled
            raise IndexMismatchError(f"index manifest {path} is not valid JSON ({exc}); {REBUILD_HINT}") from exc
        if not isinstance(data, dict):
            raise IndexMismatchError(
                f"index manifest {path} holds a JSON {type(data).__name__}, not an object; {REBUILD_HINT}"
            )
        version = data.get("format_version")
        if version == 2:
            raise IndexMismatchError(
                f"index {directory} has format version 2 (one float32 vectors file), which this gradstore does not "
                f"read: format {INDEX_FORMAT_VERSION} keeps per-checkpoint parts that updates extend; {REBUILD_HINT}"
            )
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
                row_parts=[[int(start), int(stop)] for start, stop in data["row_parts"]],
                parts=[dict(entry) for entry in data["parts"]],
                checkpoint_state={str(name): dict(state) for name, state in data["checkpoint_state"].items()},
                store_content=str(data["store_content"]) if data.get("store_content") is not None else None,
                shards=[
                    {"shard": int(e["shard"]), "rows": [int(e["rows"][0]), int(e["rows"][1])], "dir": str(e["dir"])}
                    for e in data.get("shards", [])
                ],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexMismatchError(f"index manifest {path} is malformed ({exc!r}); {REBUILD_HINT}") from exc

    @staticmethod
    def read_request(directory: Path) -> tuple[IndexOptions, list[str]]:
        """The options and checkpoints an index at ``directory`` was built with, from a manifest of any format
        version (what a rebuild needs); refused like :meth:`read` when there is none or it is unreadable."""
        try:
            manifest = IndexManifest.read(directory)
            return manifest.options, manifest.checkpoints
        except IndexMismatchError:
            try:
                data = json.loads((directory / MANIFEST).read_bytes())
                known = {f.name for f in fields(IndexOptions)}
                options = IndexOptions(**{k: v for k, v in data["options"].items() if k in known})
                return options, [str(name) for name in data["checkpoints"]]
            except Exception:  # anything unreadable: the first error says what is wrong
                pass
            raise

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
        if self.store_fingerprint != store.fingerprint() or (
            self.store_content is not None and self.store_content != store.content_fingerprint()
        ):
            refuse_broken_chain(store)  # a deleted record changes the fingerprint too: name it, not "changed"
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

    def with_search_options(self, directory: Path, options: IndexOptions | SearchOptions | None) -> IndexManifest:
        """This manifest searched with ``options``' search-time knobs; options that need another build are refused
        (:class:`SearchOptions` hold none: they are taken as they are)."""
        if options is None:
            return self
        if isinstance(options, SearchOptions):
            return replace(self, options=IndexOptions.of(self.options.build, options))
        built = self.options.build_key()
        diffs = {k: (built[k], v) for k, v in options.build_key().items() if built[k] != v}
        if diffs:
            raise IndexMismatchError(
                f"index {directory} was built with other options {diffs} (built, requested); {REBUILD_HINT}"
            )
        return replace(self, options=options)


def refuse_broken_chain(store: GradientStore) -> None:
    """A :class:`StoreCorruptError` naming the first broken link of ``store``'s records (and how many there are):
    nothing is built from, or blamed on, a store whose rows a missing record hides."""
    problems = store.chain_problems()
    if problems:
        more = f" ({len(problems) - 1} more: `gradstore verify` lists them)" if len(problems) > 1 else ""
        raise StoreCorruptError(problems[0] + more)


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
