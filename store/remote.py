"""Stores and indexes at fsspec URLs (``s3://bucket/run.zarr``, ``gs://...``, ``memory://...``).

Rules that replace what a local disk gives for free:

* **Atomic writes.** Every Zarr chunk, commit record and checksum is one object PUT, which an object store
  makes visible whole or not at all, so the per-chunk write-then-commit protocol holds unchanged: a killed
  writer leaves data objects without a commit record, which readers ignore and a resume rewrites.
* **Creation without rename.** A remote store is created by writing ``checkpoints/zarr.json`` first and the
  root ``zarr.json`` last, with a create-if-absent conditional PUT (S3 ``If-None-Match: *``): a store exists
  iff its root ``zarr.json`` does, and of two racing creators exactly one wins. A crash before the root object
  leaves only ``checkpoints/zarr.json``, which the next create overwrites.
* **Locks.** The index lock is an object created with the same conditional PUT (holder pid, host, time) and
  deleted on release; one left by a dead process on the same host is taken over, one from another host must
  be deleted by hand (its path is in the error).
* **Index cache.** Indexes are searched from local files: opening a remote index downloads its directory into
  ``$GRADSTORE_CACHE_DIR`` (default ``~/.cache/gradstore``) ``/index/<hash of the URL>-<name>``, reused while
  the remote manifest is byte-identical and every cached file matches the manifest's checksums (else it is
  downloaded again). A build to a remote path is built in that cache folder and uploaded file by file, the
  manifest deleted first and written last, so a reader sees no index, or files the manifest's checksums refuse,
  but never a mixed one served. Store rows are read remotely (whole chunks, or byte ranges for a few rows).

Credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...);
``GRADSTORE_STORAGE_OPTIONS`` (JSON) adds fsspec storage options.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import fsspec
import zarr
from fsspec.core import split_protocol

from .errors import IndexNotFoundError, RemoteStoreError, StoreLockedError

MANIFEST = "manifest.json"
POLL_S = 0.1


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for ``protocol``: listings are never cached (other processes write the same prefix)."""
    options: dict[str, Any] = {"use_listings_cache": False} if protocol in ("s3", "s3a", "gs", "gcs", "az") else {}
    extra = os.environ.get("GRADSTORE_STORAGE_OPTIONS")
    if extra:
        try:
            options.update(json.loads(extra))
        except ValueError as exc:
            raise RemoteStoreError(f"GRADSTORE_STORAGE_OPTIONS is not a JSON object ({exc})") from None
    return options


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """The (synchronous) fsspec filesystem of ``protocol``; a missing driver (s3fs, gcsfs) is named."""
    try:
        return fsspec.filesystem(protocol, **storage_options(protocol))
    except ImportError as exc:
        raise RemoteStoreError(
            f"{protocol}:// paths need an fsspec driver ({exc}); install gradstore[s3] for s3://"
        ) from None


class RemotePath:
    """A path in an fsspec filesystem with the few ``pathlib.Path`` methods the store uses. ``str()`` is the URL."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem | None = None):
        protocol, rest = split_protocol(url)
        if protocol is None:
            raise RemoteStoreError(f"{url!r} is not a URL")
        self.protocol = protocol
        self.key = rest.rstrip("/")
        self._fs = fs

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = filesystem(self.protocol)
        return self._fs

    def _with_key(self, key: str) -> RemotePath:
        return RemotePath(f"{self.protocol}://{key}", self._fs)

    def __truediv__(self, name: str | os.PathLike[str]) -> RemotePath:
        return self._with_key(f"{self.key}/{os.fspath(name).strip('/')}")

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> RemotePath:
        return self._with_key(self.key.rsplit("/", 1)[0]) if "/" in self.key else self

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.with_name(self.stem + suffix)

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def exists(self) -> bool:
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.key))

    def iterdir(self) -> Iterator[RemotePath]:
        for key in sorted(self.fs.ls(self.key, detail=False)):
            if key.rstrip("/") != self.key:
                yield self._with_key(key.rstrip("/"))

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.key))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no directories."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def files(self) -> list[str]:
        """Every object under this prefix, as paths relative to it."""
        return sorted(key[len(self.key) + 1 :] for key in self.fs.find(self.key) if key.startswith(self.key + "/"))


StorePath: TypeAlias = Path | RemotePath


def is_url(path: str | os.PathLike[str] | RemotePath) -> bool:
    """Whether ``path`` names an fsspec URL other than ``file://`` (which is an ordinary local path)."""
    if isinstance(path, RemotePath):
        return True
    protocol, _ = split_protocol(os.fspath(path) if not isinstance(path, str) else path)
    return protocol not in (None, "file", "local") and "://" in str(path)


def as_path(path: str | os.PathLike[str] | RemotePath) -> StorePath:
    """A :class:`RemotePath` for a URL, else a local :class:`~pathlib.Path` (``file://`` stripped)."""
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path)
    if is_url(text):
        return RemotePath(text)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def zarr_store(path: StorePath, read_only: bool) -> Any:
    """What ``zarr.open_group`` is given for ``path``: a local directory, or a zarr FsspecStore on the URL."""
    if isinstance(path, Path):
        return str(path)
    return zarr.storage.FsspecStore.from_url(
        str(path), storage_options=storage_options(path.protocol), read_only=read_only
    )


def node_path(store: Any, node_key: str) -> StorePath | None:
    """The :data:`StorePath` of a node in zarr ``store`` (None when the store is neither local nor fsspec)."""
    if isinstance(store, zarr.storage.FsspecStore):
        fs = store.fs
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        root = RemotePath(f"{protocol}://{store.path.strip('/')}")
        return root / node_key if node_key else root
    return None


def child_nodes(directory: StorePath) -> list[str]:
    """Names of the Zarr nodes (subfolders holding a ``zarr.json``) in ``directory``, sorted; one listing remotely."""
    if isinstance(directory, RemotePath):
        found = directory.fs.glob(f"{directory.key}/*/zarr.json")
        return sorted(key.rstrip("/").split("/")[-2] for key in found)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if (p / "zarr.json").is_file())


def orphan_nodes(directory: StorePath) -> list[str]:
    """Names of the subfolders of ``directory`` that hold files but no ``zarr.json`` (a node whose metadata was
    deleted: its data is there, invisible to Zarr), sorted."""
    if isinstance(directory, RemotePath):
        try:
            listed = directory.fs.ls(directory.key, detail=False)
        except FileNotFoundError:
            return []
        children = {key.rstrip("/").split("/")[-1] for key in listed}
        children.discard(directory.key.rstrip("/").split("/")[-1])
        return sorted(children - set(child_nodes(directory)) - {"zarr.json"})
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not (p / "zarr.json").is_file() and any(p.iterdir())
    )


def read_many(paths: Sequence[StorePath]) -> list[bytes | None]:
    """The bytes of each path (None: absent); remote ones are fetched in one concurrent batch."""
    remote = [p for p in paths if isinstance(p, RemotePath)]
    fetched: dict[str, Any] = {}
    if remote:
        fetched = remote[0].fs.cat([p.key for p in remote], on_error="return")
        if len(remote) == 1 and not isinstance(fetched, dict):
            fetched = {remote[0].key: fetched}
    out: list[bytes | None] = []
    for path in paths:
        if isinstance(path, RemotePath):
            value = fetched.get(path.key)
            if isinstance(value, FileNotFoundError) or value is None:
                out.append(None)
            elif isinstance(value, BaseException):
                raise value
            else:
                out.append(bytes(value))
        else:
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                out.append(None)
    return out


def put_if_absent(path: RemotePath, data: bytes) -> bool:
    """Create the object ``path`` unless it exists (one conditional PUT); False when it already did."""
    try:
        path.fs.pipe_file(path.key, data, mode="create")
    except FileExistsError:
        return False
    return True


def zarr_metadata(attributes: dict[str, Any], groups: Sequence[str]) -> dict[str, bytes]:
    """The ``zarr.json`` objects of a new group with ``attributes`` and empty child ``groups``, keyed by path."""
    with tempfile.TemporaryDirectory() as tmp:
        group = zarr.open_group(tmp, mode="w-", attributes=attributes)
        for name in groups:
            group.create_group(name)
        return {key: (Path(tmp) / key).read_bytes() for key in ["zarr.json", *(f"{g}/zarr.json" for g in groups)]}


# -- the index lock ------------------------------------------------------------------------------------
def _alive_here(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell: assume it is
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True


def _lock_info(path: RemotePath) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def remote_lock(path: RemotePath, store: str, wait_s: float) -> Iterator[RemotePath]:
    """Hold the lock object ``path`` (created if absent) for the block; see the module docstring for the rules."""
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": token}
    deadline = time.monotonic() + wait_s
    while not put_if_absent(path, json.dumps(record).encode()):
        info = _lock_info(path)
        if info is None:
            continue  # released meanwhile
        if info and not _alive_here(info):
            path.unlink(missing_ok=True)  # its holder died on this host: take it over
            continue
        if time.monotonic() >= deadline:
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(info.get("started", 0))))
            waited = f" (waited {wait_s:g} s)" if wait_s else ""
            raise StoreLockedError(
                f"another `gradstore index` is working on store {store}: pid {info.get('pid')} on host "
                f"{info.get('host')} since {since}Z{waited}. Wait for it to finish (or pass --wait SECONDS). A lock "
                f"whose process died on this host is taken over by itself; if it ran on another host and is gone, "
                f"delete {path}"
            )
        time.sleep(POLL_S)
    try:
        yield path
    finally:
        info = _lock_info(path)
        if info and info.get("token") == token:
            path.unlink(missing_ok=True)


# -- the local cache of remote indexes -------------------------------------------------------------------
def cache_root() -> Path:
    """``$GRADSTORE_CACHE_DIR``, else ``~/.cache/gradstore``."""
    return Path(os.environ.get("GRADSTORE_CACHE_DIR") or Path.home() / ".cache" / "gradstore")


def local_index_dir(path: StorePath) -> Path:
    """Where the index at ``path`` is read and built on this machine: itself, or its cache folder if remote."""
    if isinstance(path, Path):
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return cache_root() / "index" / f"{digest}-{path.name}"


def _cache_valid(local: Path, manifest_bytes: bytes) -> bool:
    from .manifest import IndexManifest  # late: manifest imports the store, which imports this module

    if not (local / MANIFEST).is_file() or (local / MANIFEST).read_bytes() != manifest_bytes:
        return False
    try:
        IndexManifest.read(local).check_files(local)
    except Exception:  # anything the manifest refuses: download again
        return False
    return True


def fetch_index(path: StorePath) -> Path:
    """The local folder to open the index at ``path`` from, downloaded (or re-validated) first when remote."""
    if isinstance(path, Path):
        return path
    from .durable import scratch_dir

    local = local_index_dir(path)
    for _ in range(3):  # an upload in progress may change the manifest under us: start again
        try:
            manifest_bytes = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise IndexNotFoundError(
                f"no index at {path} (no {MANIFEST}); build one with `gradstore index` or GradientIndex.build"
            ) from None
        if _cache_valid(local, manifest_bytes):
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_dir(local, "fetching")
        try:
            for name in path.files():
                if name != MANIFEST:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    path.fs.get_file((path / name).key, str(tmp / name))
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            if not _cache_valid(tmp, manifest_bytes) or (path / MANIFEST).read_bytes() != manifest_bytes:
                continue
            if local.exists():
                old = scratch_dir(local, "old")
                os.rename(local, old / "index")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, local)
            return local
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise RemoteStoreError(f"index {path} kept changing while it was downloaded (an upload in progress?); retry")


def publish_index(local: Path, path: StorePath) -> None:
    """Upload the index built in ``local`` to the remote ``path``: manifest deleted first, written last."""
    if isinstance(path, Path):
        return
    (path / MANIFEST).unlink(missing_ok=True)
    built = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name in built:
        if name != MANIFEST:
            path.fs.put_file(str(local / name), (path / name).key)
    for name in set(path.files()) - set(built):
        (path / name).unlink(missing_ok=True)  # files of an older build with another layout
    path.fs.put_file(str(local / MANIFEST), (path / MANIFEST).key)
