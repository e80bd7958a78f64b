"""The Zarr v3 gradient store: one group per run, one group per checkpoint, pre-sized row-chunked segments.

Layout::

    run.zarr/                      attrs["gradstore"] = {format_version, projection, dim, dtype, chunk_rows}
      checkpoints/<name>/          attrs = CheckpointInfo (lr, step, weights path + sha256, ...)
        adam_r, adam_c             Adam denominator factors folded into the projection, if any
        <segment>/grads  [R, D]       row-chunked (chunk_rows, D), float16 or float32
        <segment>/ids    [R]          int64 example ids
        <segment>/checksums [R/C]     hash of each committed chunk's rows, verified on read
        <segment>/fingerprints [R/C]  hash of each chunk's examples (pass segments), checked on resume
        <segment>/committed [R/C]     rows committed per chunk; one object per chunk

A segment is written one whole chunk at a time, each chunk by exactly one writer, and a chunk's commit
count is written only after its data and ids have been written (zarr's LocalStore replaces files
atomically, as an object store's PUT is: store/remote.py). Readers serve committed rows only, so a killed
writer never exposes a half-written row, and a resumed writer skips committed chunks. Parts: ``pass`` (offline
pass; row = position in the example list; ranks own chunk-aligned ranges) and ``capture-*`` (append-only, one
per writer).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from gradstore.projection import ProjectionMismatchError, ProjectionSpec, ProjectionSpecError

from .durable import rename_into_place, scratch_dir
from .errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DuplicateIdError,
    GradientShapeError,
    StoreArgumentError,
    StoreCorruptError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownExampleError,
)
from .parts import disk_full_is_typed
from .remote import (
    RemotePath,
    StorePath,
    as_path,
    child_nodes,
    node_path,
    orphan_nodes,
    put_if_absent,
    read_many,
    zarr_metadata,
    zarr_store,
)

FORMAT_VERSION = 1
StoreDtype = Literal["float16", "float32"]
DTYPES: tuple[str, ...] = get_args(StoreDtype)
CAPTURE_SEGMENT_CHUNKS = 256
PASS_SEGMENT = "pass"
_GROUP_METADATA = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'
SEGMENT_ARRAYS = ("grads", "ids", "checksums", "fingerprints", "committed")  # in the order they are created
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class CheckpointInfo:
    """Per-checkpoint metadata. ``lr`` weights the checkpoint in TracIn's sum."""

    name: str
    lr: float
    step: int | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    optimizer_path: str | None = None
    adam: bool = False
    adam_summary: dict[str, Any] | None = None  # what the Adam fold did: layout, beta2/eps/step, zeroed/floored

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise StoreArgumentError(
                f"checkpoint name {self.name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if self.adam_summary is not None:  # as it reads back from the store's JSON, so a resume compares equal
            object.__setattr__(self, "adam_summary", json.loads(json.dumps(self.adam_summary)))
        if not np.isfinite(self.lr):
            raise StoreArgumentError(f"checkpoint {self.name!r}: lr must be a finite number, got {self.lr!r}")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (checkpoint weights are recorded with theirs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_RELOG = "re-log it: `gradstore index` (or log_checkpoint) rewrites damaged chunks; capture runs must re-capture"


def _store_advice(path: StorePath) -> str:
    return f"the store cannot be read: restore the file, or {_delete_and_relog(path, 'the run')}"


def _delete_and_relog(directory: StorePath, what: str) -> str:
    return (
        f"delete {directory} and log {what} again (`gradstore index` re-logs an offline pass; the rows of a capture "
        "run must be captured again)"
    )


def rows_checksum(ids: np.ndarray, grads: np.ndarray) -> int:
    """A nonzero 63-bit hash of committed rows (ids and gradients), recorded with each chunk's commit."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8)
    digest.update(np.ascontiguousarray(grads).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1 | 1


def _disk(node: zarr.Group | zarr.Array) -> StorePath:
    """Where a node of a store lives: its local directory, or its URL in an object store."""
    store_path = node.store_path
    remote = node_path(store_path.store, store_path.path)
    if remote is not None:
        return remote
    root = getattr(store_path.store, "root", None)
    return Path(str(root)) / store_path.path if root is not None else Path(str(store_path))


def _child_dirs(directory: StorePath) -> list[str]:
    """Names of the Zarr nodes (subdirectories holding a ``zarr.json``) in ``directory``, sorted."""
    return child_nodes(directory)


def _metadata_error(meta: StorePath, exc: Exception, advice: str) -> StoreCorruptError:
    return StoreCorruptError(f"{meta} cannot be read ({type(exc).__name__}: {exc}); {advice}")


def _child(parent: zarr.Group, name: str, advice: str) -> zarr.Group | zarr.Array:
    """``parent[name]``; a node whose ``zarr.json`` is truncated or garbled is a StoreCorruptError naming it."""
    try:
        return parent[name]
    except KeyError:
        meta = _disk(parent) / name / "zarr.json"
        if meta.is_file():  # there, but zarr could not make a node of it
            raise _metadata_error(meta, ValueError("not a Zarr node"), advice) from None
        raise
    except Exception as exc:  # zarr raises JSONDecodeError, ValueError, TypeError ... for damaged metadata
        raise _metadata_error(_disk(parent) / name / "zarr.json", exc, advice) from exc


def _groups(parent: zarr.Group, advice: Callable[[str], str]) -> dict[str, zarr.Group]:
    """The child groups of ``parent``; a damaged child is named (``advice(name)`` says what to do about it)."""
    try:
        return dict(parent.groups())
    except Exception as exc:  # find the child whose metadata broke the listing
        for name in _child_dirs(_disk(parent)):
            _child(parent, name, advice(name))
        raise _metadata_error(_disk(parent) / "zarr.json", exc, advice("")) from exc


def _child_group(parent: zarr.Group, name: str, advice: str) -> zarr.Group:
    node = _child(parent, name, advice)
    if not isinstance(node, zarr.Group):
        raise StoreFormatError(f"{_disk(parent) / name} should be a group; the store is damaged")
    return node


def _child_array(parent: zarr.Group, name: str, advice: str) -> zarr.Array:
    node = _child(parent, name, advice)
    if not isinstance(node, zarr.Array):
        raise StoreFormatError(f"{_disk(parent) / name} should be an array; the store is damaged")
    return node


def _int_attr(group: zarr.Group, key: str) -> int:
    value = group.attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreFormatError(
            f"{_disk(group)}: attribute {key!r} should be an integer, got {value!r}; the store is damaged"
        )
    return value


def _matches(found: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    """Whether a shape matches one whose ``None`` entries are unknown."""
    return len(found) == len(expected) and all(e is None or f == e for f, e in zip(found, expected))


def _raw_scalar_dtype(array: zarr.Array) -> np.dtype | None:
    """The on-disk dtype of a 1-D one-value-per-chunk array stored as plain bytes (else None: read through zarr)."""
    metadata = array.metadata
    codecs = getattr(metadata, "codecs", None)
    if getattr(metadata, "zarr_format", None) != 3 or array.chunks != (1,) or not codecs or len(codecs) != 1:
        return None
    if not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs[0].endian.value if codecs[0].endian is not None else sys.byteorder
    return np.dtype(array.dtype).newbyteorder("<" if endian == "little" else ">")


def _read_scalars(array: zarr.Array, chunks: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Values of one-value chunks ``chunks`` of ``array`` (commit records, checksums) and the chunks that cannot be
    read. Read straight from their files when they are plain bytes: through zarr each costs a few ms."""
    dtype = _raw_scalar_dtype(array)
    out = np.zeros(len(chunks), dtype=np.dtype(array.dtype))
    bad: list[int] = []
    if dtype is None:
        try:
            values = np.asarray(array[:])
        except Exception:  # zarr/numcodecs raise assorted types for a truncated or garbled chunk
            for i, chunk in enumerate(chunks):
                try:
                    out[i] = np.asarray(array[chunk])
                except Exception:
                    bad.append(chunk)
            return out, bad
        return values[list(chunks)], bad
    directory, fill = _disk(array), array.metadata.fill_value
    files = read_many([directory / array.metadata.encode_chunk_key((chunk,)) for chunk in chunks])
    for i, (chunk, data) in enumerate(zip(chunks, files)):
        if data is None:
            out[i] = fill
            continue
        if len(data) != dtype.itemsize:
            bad.append(chunk)
            continue
        out[i] = np.frombuffer(data, dtype=dtype)[0]
    return out, bad


class Segment:
    """A pre-sized ``[capacity, D]`` slab of rows, its ids and its per-chunk commit counts.

    ``dim`` and ``dtype`` (the store's): each array's metadata is checked against the segment's geometry, so an
    edited shape or dtype is a :class:`StoreCorruptError` naming the array, not rows read out of place."""

    def __init__(self, group: zarr.Group, chunk_rows: int, dim: int | None = None, dtype: str | None = None):
        self.group = group
        self.name = group.basename
        self.chunk_rows = chunk_rows
        self.capacity = _int_attr(group, "capacity")
        self.kind = str(group.attrs.get("kind"))
        self.directory = _disk(group)
        self._geometry: dict[str, tuple[tuple[int | None, ...], tuple[int | None, ...], str | None]] = {
            "grads": ((self.capacity, dim), (chunk_rows, dim), dtype),
            "ids": ((self.capacity,), (chunk_rows,), "int64"),
            **{name: ((self.n_chunks,), (1,), None) for name in ("checksums", "fingerprints", "committed")},
        }
        self._arrays: dict[str, zarr.Array] = {}
        self._structure: str | None = None  # structure_problem(), once known ("" when whole)

    @property
    def n_chunks(self) -> int:
        return -(-self.capacity // self.chunk_rows)

    def _advice(self) -> str:
        return _delete_and_relog(self.directory, f"segment {self.name!r}")

    def _array(self, name: str) -> zarr.Array | None:
        if name in self._arrays:
            return self._arrays[name]
        if not (self.directory / name / "zarr.json").is_file():
            return None
        array = _child_array(self.group, name, self._advice())
        shape, chunks, dtype = self._geometry[name]
        if not (_matches(array.shape, shape) and _matches(array.chunks, chunks)) or dtype not in (
            None,
            str(array.dtype),
        ):
            held = f"{self.capacity} rows in chunks of {self.chunk_rows}" + (f" as {dtype}" if dtype else "")
            raise StoreCorruptError(
                f"{self.directory / name / 'zarr.json'} has shape {array.shape}, chunks {array.chunks}, dtype "
                f"{array.dtype}, where segment {self.name!r} holds {held} (edited or damaged); {self._advice()}"
            )
        self._arrays[name] = array
        return array

    def _require(self, name: str) -> zarr.Array:
        array = self._array(name)
        if array is None:
            raise StoreFormatError(f"{self.directory / name} is missing; {self._advice()}")
        return array

    @property
    def ids_array(self) -> zarr.Array:
        """``[capacity]`` int64 example ids (-1 past the committed rows of a chunk)."""
        return self._require("ids")

    @property
    def grads_array(self) -> zarr.Array:
        """``[capacity, D]`` projected gradients."""
        return self._require("grads")

    def _file(self, array: str, chunk: int | None = None) -> StorePath:
        """The metadata file of ``array`` (``chunk`` None) or the file of one of its one-value chunks."""
        if chunk is None:
            return self.directory / array / "zarr.json"
        return self.directory / array / self._require(array).metadata.encode_chunk_key((chunk,))

    def structure_problem(self) -> str | None:
        """Why the segment's arrays do not form a whole (an array's ``zarr.json`` gone while rows are recorded),
        or None: intact, or a creation cut short before any row was written (readers treat it as empty)."""
        if self._structure is not None:
            return self._structure or None
        present = [(self.directory / name / "zarr.json").is_file() for name in SEGMENT_ARRAYS]
        problem = ""
        if not all(present):
            # arrays are created in SEGMENT_ARRAYS order and written only once all exist: a cut-short creation
            # lacks a suffix of them and holds no chunk
            first_missing = present.index(False)
            holds_rows = any((self.directory / name / "c").exists() for name in SEGMENT_ARRAYS)
            if holds_rows or any(present[first_missing:]):
                missing = self.directory / SEGMENT_ARRAYS[first_missing] / "zarr.json"
                problem = (
                    f"{missing} is missing while segment {self.name!r} records rows (deleted metadata: its rows "
                    f"cannot be read); restore it, or {self._advice()}"
                )
        self._structure = problem
        return problem or None

    def commit_records(self) -> tuple[np.ndarray, list[int]]:
        """``(rows committed per chunk, chunks whose records are damaged)``; a damaged chunk counts 0 rows. Damaged:
        an unreadable or impossible commit record, a committed chunk without its checksum record, or a committed pass
        chunk without the example fingerprint its neighbours have. A segment whose creation was cut short has none
        committed; one whose array metadata is gone is a :class:`StoreCorruptError` (:meth:`structure_problem`)."""
        counts, problems = self._chunk_records()
        return counts, sorted(problems)

    def _chunk_records(self) -> tuple[np.ndarray, dict[int, str]]:
        """Commit counts (damaged ones zeroed) and, per damaged chunk, why (naming the record's file)."""
        problem = self.structure_problem()
        if problem is not None:
            raise StoreCorruptError(problem)
        committed = self._array("committed")
        if committed is None:
            return np.zeros(self.n_chunks, dtype=np.int64), {}
        for name in SEGMENT_ARRAYS:
            self._array(name)  # damaged metadata (garbled, edited shape) is a StoreCorruptError naming it
        values, bad = _read_scalars(committed, range(self.n_chunks))
        counts = values.astype(np.int64)
        capacities = np.minimum(self.chunk_rows, self.capacity - np.arange(self.n_chunks) * self.chunk_rows)
        problems = {
            int(k): f"the commit record {self._file('committed', int(k))} of chunk {int(k)} is unreadable or impossible"
            for k in sorted(set(bad) | {int(k) for k in np.flatnonzero((counts < 0) | (counts > capacities))})
        }
        counts[list(problems)] = 0
        sums = self.checksum_records()
        for k in np.flatnonzero((counts > 0) & (sums == 0)).tolist():
            problems[k] = (
                f"the checksum record {self._file('checksums', k)} of committed chunk {k} is missing (deleted: its "
                "rows cannot be verified)"
            )
        if self.kind == "pass":
            prints = self.fingerprint_records()
            if (prints[counts > 0] != 0).any():  # fingerprinted pass: each committed chunk has one
                for k in np.flatnonzero((counts > 0) & (prints == 0)).tolist():
                    problems[k] = (
                        f"the example fingerprint record {self._file('fingerprints', k)} of committed chunk {k} is "
                        "missing (deleted: a resumed pass could not check its examples)"
                    )
        counts[list(problems)] = 0
        return counts, problems

    def checksum_records(self) -> np.ndarray:
        """``[n_chunks]`` recorded chunk checksums (0: none recorded; an unreadable one reads 0)."""
        return _read_scalars(self._require("checksums"), range(self.n_chunks))[0].astype(np.uint64)

    def fingerprint_records(self) -> np.ndarray:
        """``[n_chunks]`` recorded example fingerprints (0: none recorded)."""
        return _read_scalars(self._require("fingerprints"), range(self.n_chunks))[0].astype(np.uint64)

    def committed_counts(self) -> np.ndarray:
        """Rows committed in each chunk (0 = not committed); a damaged record is a :class:`StoreCorruptError`."""
        counts, problems = self._chunk_records()
        if problems:
            first = min(problems)
            more = f" (and chunks {sorted(problems)[1:10]})" if len(problems) > 1 else ""
            raise StoreCorruptError(f"{self.directory}: {problems[first]}{more}; {self._repair_advice()}")
        return counts

    def _repair_advice(self) -> str:
        """What repairs a chunk of this segment: a pass re-logs it; a capture segment's rows must be captured again."""
        if self.kind == "capture":
            return f"restore the file, or {self._advice()}"
        return _RELOG

    def chain_problems(self) -> list[str]:
        """Every broken link between this segment's records, one line each (empty: a whole chain): damaged records
        (:meth:`commit_records`), rows with a checksum but no commit record (a deleted record, or a writer killed
        between the two), holes in an append-only capture segment, and chunks past or short of the count a capture
        writer sealed. A capture segment's last written chunk without a commit is a write cut short (not damage)
        unless its writer had recorded it as committed (:meth:`record_flushed`)."""
        try:
            counts, problems = self._chunk_records()
        except StoreCorruptError as exc:
            return [str(exc)]
        lines = [f"{self.directory}: {why}; {self._repair_advice()}" for _, why in sorted(problems.items())]
        committed = self._array("committed")
        if committed is None:
            return lines
        sums = self.checksum_records()
        damaged = np.isin(np.arange(self.n_chunks), list(problems))
        recorded = (counts > 0) | (sums != 0) | damaged
        tail = int(np.flatnonzero(recorded)[-1]) if recorded.any() else -1
        sealed = self.sealed_chunks or 0
        for k in np.flatnonzero((counts == 0) & ~damaged).tolist():
            if self.kind == "capture" and (k < tail or k < sealed):  # one writer commits its chunks in order
                why = "is not committed, but later rows of this append-only segment are (a deleted commit record)"
            elif sums[k] != 0 and (self.kind != "capture" or k != tail):  # a capture's tail: a write cut short
                why = "has rows and a checksum but no commit record (deleted, or its writer was killed mid-commit)"
            else:
                continue
            lines.append(f"{self.directory}: chunk {k} ({self._file('committed', k)}) {why}; {self._repair_advice()}")
        return lines

    @property
    def sealed_chunks(self) -> int | None:
        """Chunks a capture writer recorded as committed when it last flushed (None: never recorded)."""
        value = self.group.attrs.get("sealed_chunks")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def record_flushed(self, sealed_chunks: int, skipped: set[int]) -> None:
        """One attribute write (a single writer per segment): the chunks committed so far and the skipped ids."""
        merged = sorted(set(self.skipped_ids.tolist()) | {int(i) for i in skipped})
        self.group.attrs.update({"sealed_chunks": int(sealed_chunks), "skipped_ids": merged})

    def _unreadable(self, start: int, stop: int, error: Exception) -> StoreCorruptError:
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            lo, hi = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.capacity)
            try:
                self.ids_array[lo:hi], self.grads_array[lo:hi]
            except Exception as exc:
                error = exc
                break
        else:
            lo, hi = start, stop
        return StoreCorruptError(
            f"{self.directory}: chunk {lo // self.chunk_rows} (rows {lo}..{hi - 1}) cannot be read ({error}); " + _RELOG
        )

    def chunk_intact(self, chunk: int, counts: np.ndarray | None = None) -> bool:
        """Whether a committed chunk's rows read back and match their checksum (True when none was recorded).

        ``counts``: :meth:`committed_counts`, when the caller has them (each read costs one file per chunk)."""
        counts = self.committed_counts() if counts is None else counts
        n = int(counts[chunk])
        try:
            self.read_rows(chunk * self.chunk_rows, chunk * self.chunk_rows + n, counts=counts)
        except StoreCorruptError:
            return False
        return True

    def read_rows(
        self, start: int, stop: int, verify: bool = True, counts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, grads)`` of rows ``[start, stop)``; with ``verify``, each whole committed chunk in the range is
        checked against the checksum written with its commit (a damaged chunk raises :class:`StoreCorruptError`)."""
        try:
            ids, grads = np.asarray(self.ids_array[start:stop]), np.asarray(self.grads_array[start:stop])
        except StoreFormatError:
            raise
        except Exception as exc:  # a truncated or garbled chunk file: name the first chunk that fails
            raise self._unreadable(start, stop, exc) from exc
        checksums = self._array("checksums") if verify else None
        if checksums is None:
            return ids, grads
        counts = self.committed_counts() if counts is None else counts
        chunks = range(start // self.chunk_rows, -(-stop // self.chunk_rows))
        recorded, unreadable = _read_scalars(checksums, chunks)
        for chunk, expected in zip(chunks, recorded.tolist()):
            lo, n = chunk * self.chunk_rows, int(counts[chunk])
            if chunk in unreadable:
                raise StoreCorruptError(
                    f"{self.directory}/checksums: the checksum of chunk {chunk} cannot be read; {_RELOG}"
                )
            if lo < start or lo + n > stop or n == 0:
                continue  # only part of the chunk was read, or it holds no committed row
            if not expected:
                raise StoreCorruptError(
                    f"{self.directory}: the checksum record {self._file('checksums', chunk)} of committed chunk "
                    f"{chunk} is missing (deleted: its rows cannot be verified); {self._repair_advice()}"
                )
            if rows_checksum(ids[lo - start : lo - start + n], grads[lo - start : lo - start + n]) != expected:
                raise StoreCorruptError(
                    f"{self.directory}: chunk {chunk} (rows {lo}..{lo + n - 1}) fails its checksum; {_RELOG}"
                )
        return ids, grads

    def row_ranges(self, counts: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Committed rows as merged ``[start, stop)`` ranges."""
        counts = self.committed_counts() if counts is None else counts
        ranges: list[tuple[int, int]] = []
        for chunk in np.flatnonzero(counts):
            start, stop = int(chunk) * self.chunk_rows, int(chunk) * self.chunk_rows + int(counts[chunk])
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return ranges

    def chunk_ids(self, chunk: int) -> np.ndarray:
        start = chunk * self.chunk_rows
        return np.asarray(self.ids_array[start : min(start + self.chunk_rows, self.capacity)])

    @property
    def skipped_ids(self) -> np.ndarray:
        """Ids whose training step this segment's writer saw skipped (a GradScaler overflow): zero rows, not absent."""
        return np.asarray(self.group.attrs.get("skipped_ids", []), dtype=np.int64)

    def record_skipped(self, ids: set[int]) -> None:
        """Add to :attr:`skipped_ids` (one writer per segment, so the attribute update cannot race)."""
        merged = sorted(set(self.skipped_ids.tolist()) | {int(i) for i in ids})
        self.group.attrs.update({"skipped_ids": merged})

    def chunk_fingerprint(self, chunk: int) -> int:
        """The content fingerprint recorded with a chunk's rows (0: none recorded, e.g. capture or an older store)."""
        fingerprints = self._array("fingerprints")
        return 0 if fingerprints is None else int(_read_scalars(fingerprints, [chunk])[0][0])

    def write_chunk(self, chunk: int, ids: np.ndarray, grads: np.ndarray, fingerprint: int = 0) -> None:
        """Write one whole chunk (padded past ``len(ids)``) and its content fingerprint, then commit its row count."""
        n = len(ids)
        start = chunk * self.chunk_rows
        rows = min(self.chunk_rows, self.capacity - start)
        if not 0 < n <= rows:
            raise GradientShapeError(f"chunk {chunk} of segment {self.name!r} holds 1..{rows} rows, got {n}")
        grads_array, ids_array = self.grads_array, self.ids_array
        if grads.shape != (n, grads_array.shape[1]):
            raise GradientShapeError(f"expected gradients of shape ({n}, {grads_array.shape[1]}), got {grads.shape}")
        padded_grads = np.zeros((rows, grads.shape[1]), dtype=grads_array.dtype)
        padded_grads[:n] = grads
        padded_ids = np.full(rows, -1, dtype=np.int64)
        padded_ids[:n] = ids
        with disk_full_is_typed(self.directory):  # a full disk: nothing committed, the chunk is written on resume
            grads_array[start : start + rows] = padded_grads
            ids_array[start : start + rows] = padded_ids
            checksums = self._array("checksums")
            if checksums is not None:
                checksums[chunk] = np.uint64(rows_checksum(padded_ids[:n], padded_grads[:n]))
            if fingerprint:
                self._require("fingerprints")[chunk] = np.uint64(fingerprint)
            self.commit_chunk(chunk, n)

    def commit_chunk(self, chunk: int, rows: int) -> None:
        """Record ``rows`` committed rows in ``chunk``: only now do readers see them (call after writing the data)."""
        self._require("committed")[chunk] = rows


class GradientStore:
    """A run's per-example projected gradients, one ``[N, D]`` matrix per checkpoint.

    Open an existing store with :meth:`open`; writers (the logger) use :meth:`create` or
    :meth:`open` with ``mode="a"``.
    """

    def __init__(self, root: zarr.Group, path: StorePath, read_only: bool):
        self.root = root
        self.path = path
        self.read_only = read_only
        meta = _read_meta(root, path)
        self.spec: ProjectionSpec = meta["spec"]
        self.dtype: str = meta["dtype"]
        self.chunk_rows: int = meta["chunk_rows"]
        self.dim: int = self.spec.dim

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | RemotePath, mode: Literal["r", "a"] = "r") -> GradientStore:
        """Open an existing store (a folder, or a URL such as ``s3://bucket/run.zarr``), read-only by default."""
        path = as_path(path)
        if not (path / "zarr.json").exists():
            checkpoints = path / "checkpoints"
            if _child_dirs(checkpoints) or orphan_nodes(checkpoints):  # a killed create leaves an empty group only
                raise StoreCorruptError(
                    f"{path / 'zarr.json'} is missing while {path} holds checkpoints (deleted metadata: the projection "
                    f"is unknown); {_store_advice(path)}"
                )
            raise StoreNotFoundError(f"no gradient store at {path} (run `gradstore index` or GradientLogger first)")
        if mode not in ("r", "a"):
            raise StoreArgumentError(f"mode must be 'r' or 'a', got {mode!r}")
        try:
            root = zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode)
        except Exception as exc:  # a truncated or garbled root zarr.json
            raise _metadata_error(path / "zarr.json", exc, _store_advice(path)) from exc
        if (
            mode == "a" and not (path / "checkpoints" / "zarr.json").is_file() and not orphan_nodes(path)
        ):  # an older gradstore killed mid-creation: finish creating it
            root.create_group("checkpoints")
        return cls(root, path, read_only=mode == "r")

    @classmethod
    def create(
        cls, path: str | Path | RemotePath, spec: ProjectionSpec, dtype: str = "float16", chunk_rows: int = 1024
    ) -> GradientStore:
        """Create a new, empty store (a folder, or a URL); fails if one exists."""
        path = as_path(path)
        if dtype not in DTYPES:
            raise StoreArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise StoreArgumentError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if spec.matrix_sha256 is None:
            raise ProjectionSpecError("store the spec with its matrix checksum (ProjectionSpec.with_checksum)")
        if (path / "zarr.json").exists():
            raise StoreExistsError(f"a store already exists at {path}; open it, or choose another path")
        if isinstance(path, Path) and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreExistsError(f"{path} exists and is not a gradient store; remove it or choose another path")
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "projection": spec.to_dict(),
            "dim": spec.dim,
            "dtype": dtype,
            "chunk_rows": chunk_rows,
        }
        if isinstance(path, RemotePath):
            return cls._create_remote(path, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = scratch_dir(path, "creating")  # built aside and renamed: a crash never leaves half a store
        zarr.open_group(str(scratch), mode="w-", attributes={"gradstore": meta}).create_group("checkpoints")
        if not rename_into_place(scratch, path):
            raise StoreExistsError(f"a store was created at {path} by another process meanwhile; open it")
        return cls(zarr.open_group(str(path), mode="r+"), path, read_only=False)

    @classmethod
    def _create_remote(cls, path: RemotePath, meta: dict[str, Any]) -> GradientStore:
        """No rename on object stores: ``checkpoints/zarr.json`` first, then the root ``zarr.json`` by a conditional
        create-if-absent PUT, which is the commit (a store exists iff its root ``zarr.json`` does)."""
        leftovers = set(path.files()) - {"checkpoints/zarr.json"}  # what a create killed before its commit leaves
        if leftovers:
            raise StoreExistsError(
                f"{path} holds objects ({sorted(leftovers)[:5]}) but no gradient store; remove them or choose "
                "another path"
            )
        objects = zarr_metadata({"gradstore": meta}, ["checkpoints"])
        (path / "checkpoints" / "zarr.json").write_bytes(objects["checkpoints/zarr.json"])
        if not put_if_absent(path / "zarr.json", objects["zarr.json"]):
            raise StoreExistsError(f"a store was created at {path} by another process meanwhile; open it")
        return cls(zarr.open_group(zarr_store(path, read_only=False), mode="r+"), path, read_only=False)

    @classmethod
    def open_or_create(
        cls, path: str | Path | RemotePath, spec: ProjectionSpec, dtype: str = "float16", chunk_rows: int = 1024
    ) -> GradientStore:
        """Open a store for writing, creating it if absent; refuses a store written with another projection."""
        path = as_path(path)
        if not (path / "zarr.json").exists():
            try:
                return cls.create(path, spec, dtype=dtype, chunk_rows=chunk_rows)
            except StoreExistsError:
                if not (path / "zarr.json").exists():
                    raise  # something else is there
        store = cls.open(path, mode="a")
        store.check_compatible(spec, dtype)
        return store

    def check_compatible(self, spec: ProjectionSpec, dtype: str | None = None) -> None:
        """Raise unless ``spec`` (and ``dtype``) match the ones this store was written with."""
        if not self.spec.same_projection(spec):
            raise ProjectionMismatchError(
                f"store {self.path} was written with a different projection "
                f"(stored: init={self.spec.init}, seed={self.spec.seed}, D={self.spec.dim}, "
                f"layers={[layer.name for layer in self.spec.layers]}; requested: init={spec.init}, seed={spec.seed}, "
                f"D={spec.dim}, layers={[layer.name for layer in spec.layers]}); use the same rank/init/seed/layers "
                "or a new store path"
            )
        if dtype is not None and dtype != self.dtype:
            raise StoreFormatError(f"store {self.path} holds {self.dtype} gradients, not {dtype}")

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"store {self.path} is open read-only; use GradientStore.open(path, mode='a')")

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint names, in the order they were started."""
        if not (self.path / "checkpoints" / "zarr.json").is_file():
            self._refuse_missing_checkpoints_group()
            return []  # an older gradstore killed mid-creation
        self._refuse_orphans(self.path / "checkpoints", "checkpoint")
        groups = _groups(self._checkpoints_group(), self._checkpoint_advice)
        return sorted(groups, key=lambda name: (groups[name].attrs.get("created_at", 0.0), name))

    def _refuse_missing_checkpoints_group(self) -> None:
        """A :class:`StoreCorruptError` when ``checkpoints/zarr.json`` is gone but checkpoints are there (it holds no
        attributes, so writing it again is the whole repair)."""
        if "checkpoints" in orphan_nodes(self.path):
            meta = self.path / "checkpoints" / "zarr.json"
            raise StoreCorruptError(
                f"{meta} is missing while the store holds checkpoints (deleted metadata: their rows are invisible); "
                f"restore it: it holds no data, only {_GROUP_METADATA.decode()}"
            )

    def _refuse_orphans(self, directory: StorePath, what: str) -> None:
        """A :class:`StoreCorruptError` for a folder of ``directory`` holding data but no ``zarr.json``: Zarr would
        not see it, so its rows would be dropped (and a writer would log a duplicate beside them)."""
        for name in orphan_nodes(directory):
            label = what if what.startswith("the ") else f"{what} {name!r}"
            advice = _delete_and_relog(directory / name, label)
            raise StoreCorruptError(
                f"{directory / name / 'zarr.json'} is missing while {directory / name} holds data (deleted metadata of "
                f"{label}: its rows would be dropped); restore it, or {advice}"
            )

    def _checkpoint_advice(self, name: str) -> str:
        if not name:
            return _store_advice(self.path)
        return _delete_and_relog(self.path / "checkpoints" / name, f"checkpoint {name!r}")

    def _checkpoints_group(self) -> zarr.Group:
        if not (self.path / "checkpoints" / "zarr.json").is_file():
            self._refuse_missing_checkpoints_group()
        return _child_group(self.root, "checkpoints", _store_advice(self.path))

    def _checkpoint_group(self, name: str) -> zarr.Group:
        try:
            return _child_group(self._checkpoints_group(), name, self._checkpoint_advice(name))
        except KeyError:
            raise CheckpointNotFoundError(
                f"checkpoint {name!r} is not in store {self.path}; it has {self.checkpoints}"
            ) from None

    def checkpoint_info(self, name: str) -> CheckpointInfo:
        attrs: dict[str, Any] = dict(self._checkpoint_group(name).attrs)
        known = {f.name for f in fields(CheckpointInfo)}  # other keys (created_at, records added later) are kept aside
        try:
            return CheckpointInfo(**{key: value for key, value in attrs.items() if key in known})
        except (TypeError, ValueError) as exc:
            raise StoreFormatError(f"{self.path}/checkpoints/{name}: malformed checkpoint metadata ({exc})") from exc

    def begin_checkpoint(self, info: CheckpointInfo, adam_factors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Create a checkpoint, or check that an existing one has the same metadata (for resuming)."""
        self._require_writable()
        if info.adam != (adam_factors is not None):
            raise StoreArgumentError("CheckpointInfo.adam must say whether Adam factors are given")
        checkpoints = self._checkpoints_group()
        self._refuse_orphans(self.path / "checkpoints", "checkpoint")
        if (self.path / "checkpoints" / info.name / "zarr.json").is_file():
            existing = self.checkpoint_info(info.name)
            diffs = {k: (v, getattr(info, k)) for k, v in asdict(existing).items() if getattr(info, k) != v}
            weights_given = info.weights_path is not None or info.weights_sha256 is not None
            weights_known = existing.weights_path is not None or existing.weights_sha256 is not None
            if not weights_given or not weights_known:  # not given now (keep them), or given for the first time
                diffs.pop("weights_path", None)
                diffs.pop("weights_sha256", None)
            if existing.weights_sha256 is not None and existing.weights_sha256 == info.weights_sha256:
                diffs.pop("weights_path", None)  # same weights, moved run directory
            if existing.optimizer_path is not None and info.optimizer_path is not None:
                diffs.pop("optimizer_path", None)  # the Adam factors themselves are compared below
            if existing.adam_summary is None:
                diffs.pop("adam_summary", None)  # logged before summaries were recorded
            if diffs:
                raise CheckpointMismatchError(
                    f"checkpoint {info.name!r} already exists with different metadata {diffs} (stored, given); "
                    "resume with the same arguments, log under a new checkpoint name, or "
                    f"{_delete_and_relog(self.path / 'checkpoints' / info.name, 'it with these arguments')}"
                )
            group = self._checkpoint_group(info.name)
            if weights_given and not weights_known and not diffs:
                group.attrs.update({"weights_path": info.weights_path, "weights_sha256": info.weights_sha256})
        else:
            group = checkpoints.create_group(info.name, attributes={**asdict(info), "created_at": time.time()})
        if adam_factors is not None:
            for key, values in zip(("adam_r", "adam_c"), adam_factors):
                values = np.asarray(values, dtype=np.float32)
                if (_disk(group) / key / "zarr.json").is_file():
                    if not np.array_equal(
                        np.asarray(_child_array(group, key, self._checkpoint_advice(info.name))[:]), values
                    ):
                        raise CheckpointMismatchError(
                            f"checkpoint {info.name!r}: the optimizer state differs from the one it was started with"
                        )
                else:
                    group.create_array(key, data=values, chunks=values.shape)

    def record_weights(self, name: str, weights_path: str | Path, sha256: str) -> None:
        """Record the weights file of a checkpoint logged without one (an older capture run); a checkpoint that
        records other weights is refused (:class:`CheckpointMismatchError`)."""
        self._require_writable()
        info = self.checkpoint_info(name)
        if info.weights_sha256 not in (None, sha256):
            raise CheckpointMismatchError(
                f"checkpoint {name!r} was logged with weights of sha256 {info.weights_sha256}, not {weights_path} "
                f"(sha256 {sha256})"
            )
        self._checkpoint_group(name).attrs.update({"weights_path": str(weights_path), "weights_sha256": sha256})

    def logged_by_capture(self, name: str) -> bool:
        """Whether a checkpoint's rows were captured during training (``capture-*`` segments), not logged by a pass."""
        return any(segment.kind == "capture" for segment in self.segments(name))

    def adam_factors(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored Adam denominator factors ``(r, c)``, concatenated over layers in spec order."""
        group = self._checkpoint_group(name)
        if not group.attrs.get("adam", False):
            return None
        try:
            advice = self._checkpoint_advice(name)
            return tuple(np.asarray(_child_array(group, key, advice)[:]) for key in ("adam_r", "adam_c"))  # type: ignore[return-value]
        except KeyError:
            raise StoreFormatError(
                f"checkpoint {name!r} says it has Adam factors but they are missing; resume its logging to rewrite them"
            ) from None

    # -- segments ---------------------------------------------------------------------------------
    def segments(self, checkpoint: str) -> list[Segment]:
        group = self._checkpoint_group(checkpoint)
        directory = self.path / "checkpoints" / checkpoint
        self._refuse_orphans(directory, "segment")
        groups = _groups(
            group,
            lambda name: (
                _delete_and_relog(directory / name, f"segment {name!r}")
                if name
                else self._checkpoint_advice(checkpoint)
            ),
        )
        return [Segment(g, self.chunk_rows, self.dim, self.dtype) for _, g in sorted(groups.items())]

    def _create_segment(self, checkpoint: str, name: str, kind: str, capacity: int) -> Segment:
        self._require_writable()
        group = self._checkpoint_group(checkpoint)
        if (_disk(group) / name / "zarr.json").is_file():
            segment_group = _child_group(group, name, _delete_and_relog(_disk(group) / name, f"segment {name!r}"))
        else:
            segment_group = group.create_group(name, attributes={"kind": kind, "capacity": capacity})
        chunk = self.chunk_rows
        n_chunks = -(-capacity // chunk)
        directory = _disk(segment_group)
        # Arrays are created in this order; a crash in between leaves a segment readers treat as empty.
        if not (directory / "grads" / "zarr.json").is_file():
            segment_group.create_array(
                "grads",
                shape=(capacity, self.dim),
                chunks=(chunk, self.dim),
                dtype=self.dtype,
                compressors=None,
                fill_value=0,
            )
        if not (directory / "ids" / "zarr.json").is_file():
            segment_group.create_array("ids", shape=(capacity,), chunks=(chunk,), dtype="int64", fill_value=-1)
        if not (
            directory / "checksums" / "zarr.json"
        ).is_file():  # hash of each committed chunk's rows, verified when they are read
            segment_group.create_array(
                "checksums", shape=(n_chunks,), chunks=(1,), dtype="uint64", compressors=None, fill_value=0
            )
        if not (
            directory / "fingerprints" / "zarr.json"
        ).is_file():  # hash of each chunk's examples, checked when a pass resumes
            segment_group.create_array(
                "fingerprints", shape=(n_chunks,), chunks=(1,), dtype="uint64", compressors=None, fill_value=0
            )
        if not (directory / "committed" / "zarr.json").is_file():
            segment_group.create_array(
                "committed", shape=(n_chunks,), chunks=(1,), dtype="int32", compressors=None, fill_value=0
            )
        return Segment(segment_group, chunk, self.dim, self.dtype)

    def pass_segment(self, checkpoint: str, num_rows: int) -> Segment:
        """The offline-pass segment of a checkpoint (row i = i-th example), created if absent."""
        group = self._checkpoint_group(checkpoint)
        if (_disk(group) / PASS_SEGMENT / "zarr.json").is_file():
            advice = _delete_and_relog(self.path / "checkpoints" / checkpoint / PASS_SEGMENT, "it")
            capacity = _int_attr(_child_group(group, PASS_SEGMENT, advice), "capacity")
            if capacity != num_rows:
                raise CheckpointMismatchError(
                    f"checkpoint {checkpoint!r} was started over {capacity} examples, now given {num_rows}; "
                    "resume with the same examples or use a new checkpoint name"
                )
        return self._create_segment(checkpoint, PASS_SEGMENT, "pass", num_rows)

    def new_capture_segment(self, checkpoint: str, writer: str = "r0") -> Segment:
        """A fresh append-only segment owned by one writer (one per process and session)."""
        name = f"capture-{writer}-{uuid.uuid4().hex[:12]}"
        return self._create_segment(checkpoint, name, "capture", CAPTURE_SEGMENT_CHUNKS * self.chunk_rows)

    # -- reading -------------------------------------------------------------------------------
    def committed_ids(self, checkpoint: str) -> np.ndarray:
        """Ids of every committed row of a checkpoint (in storage order)."""
        out = [np.asarray(s.ids_array[a:b]) for s in self.segments(checkpoint) for a, b in s.row_ranges()]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def skipped_ids(self, checkpoint: str) -> np.ndarray:
        """Ids of examples whose training step was skipped at this checkpoint (sorted, unique)."""
        found = [segment.skipped_ids for segment in self.segments(checkpoint)]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def num_rows(self, checkpoint: str) -> int:
        return sum(int(segment.committed_counts().sum()) for segment in self.segments(checkpoint))

    def iter_blocks(self, checkpoint: str, block_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream committed ``(ids, grads)`` blocks of at most ``block_rows`` rows."""
        block_rows = max(1, block_rows // self.chunk_rows) * self.chunk_rows  # whole chunks: each is verified
        for segment in self.segments(checkpoint):
            counts = segment.committed_counts()
            for start, stop in segment.row_ranges(counts):
                for lo in range(start, stop, block_rows):
                    yield segment.read_rows(lo, min(lo + block_rows, stop), counts=counts)

    def read(self, checkpoint: str, ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Committed rows of a checkpoint: ``(ids [n], grads [n, D])``, optionally only the given ids, in order."""
        blocks = list(self.iter_blocks(checkpoint))
        all_ids = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, dtype=np.int64)
        grads = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros((0, self.dim), dtype=self.dtype)
        unique, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIdError(
                f"checkpoint {checkpoint!r} holds example ids more than once: {unique[counts > 1][:10].tolist()}"
            )
        if ids is None:
            return all_ids, grads
        wanted = np.asarray(ids, dtype=np.int64)
        order = np.argsort(all_ids)
        sorted_ids = all_ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), max(len(sorted_ids) - 1, 0))
        hit = sorted_ids[pos] == wanted if len(sorted_ids) else np.zeros(len(wanted), dtype=bool)
        if not hit.all():
            missing = wanted[~hit]
            raise UnknownExampleError(
                f"checkpoint {checkpoint!r} has no committed row for ids {missing[:10].tolist()}"
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        rows = order[pos]
        return wanted, grads[rows]

    def verify(self) -> list[str]:
        """Walk every checkpoint, segment and committed chunk; return one line per damaged part (empty: intact).

        Besides every committed chunk against its checksum, the records must form one chain: metadata for every
        folder holding data, a checksum for every commit, a commit for every checksum (:meth:`Segment.chain_problems`).
        """
        problems: dict[str, None] = {}  # ordered, without repeats
        try:
            names = self.checkpoints
        except StoreFormatError as exc:  # walk the others too
            problems[str(exc)] = None
            names = _child_dirs(self.path / "checkpoints")
        for name in names:
            for line in self._verify_checkpoint(name):
                problems[line] = None
        return list(problems)

    def _verify_checkpoint(self, name: str) -> list[str]:
        """:meth:`verify`'s lines for one checkpoint."""
        try:
            self.checkpoint_info(name)
            self.adam_factors(name)
            segments = self._each_segment(name)
        except StoreFormatError as exc:
            return [str(exc)]
        lines: list[str] = []
        try:
            self._refuse_orphans(_disk(self._checkpoint_group(name)), "segment")
        except StoreFormatError as exc:
            lines.append(str(exc))
        for segment in segments:
            if isinstance(segment, StoreFormatError):
                lines.append(str(segment))
                continue
            lines += segment.chain_problems()
            try:
                counts = segment._chunk_records()[0]
            except StoreFormatError:
                continue  # in chain_problems
            for chunk in np.flatnonzero(counts):
                lo = int(chunk) * segment.chunk_rows
                try:
                    segment.read_rows(lo, lo + int(counts[chunk]), counts=counts)
                except StoreFormatError as exc:
                    lines.append(str(exc))
        return lines

    def chain_problems(self) -> list[str]:
        """The broken links of every checkpoint's records (no chunk data is read): what :meth:`verify` reports
        without the checksum pass, cheap enough to run before every index build."""
        lines: list[str] = []
        for name in self.checkpoints:
            for segment in self.segments(name):
                lines += segment.chain_problems()
        return lines

    def _each_segment(self, checkpoint: str) -> list[Segment | StoreFormatError]:
        """Each segment of a checkpoint, or the error that keeps it from being read (so one does not hide others)."""
        group = self._checkpoint_group(checkpoint)
        out: list[Segment | StoreFormatError] = []
        for name in _child_dirs(_disk(group)):
            try:
                node = _child(group, name, _delete_and_relog(_disk(group) / name, f"segment {name!r}"))
                if isinstance(node, zarr.Group):
                    out.append(Segment(node, self.chunk_rows, self.dim, self.dtype))
            except StoreFormatError as exc:
                out.append(exc)
        return out

    @property
    def layer_slices(self) -> dict[str, slice]:
        """Column range of each layer in the ``D``-dimensional vectors."""
        return {layer.name: layer.slice for layer in self.spec.layers}

    def fingerprint(self) -> str:
        """Hash of the metadata and commit state: changes whenever rows are added or rewritten."""
        digest = hashlib.sha256(json.dumps(dict(self.root.attrs), sort_keys=True).encode())
        for name in self.checkpoints:
            digest.update(json.dumps(dict(self._checkpoint_group(name).attrs), sort_keys=True).encode())
            for segment in self.segments(name):
                digest.update(segment.name.encode())
                digest.update(segment.committed_counts().tobytes())
                digest.update(segment.skipped_ids.tobytes())
        return digest.hexdigest()

    def content_fingerprint(self) -> str:
        """Hash of every committed chunk's checksum record: changes when rows are rewritten with other values under
        the same ids, segment names and counts (which :meth:`fingerprint`, kept stable for older indexes, misses)."""
        digest = hashlib.sha256()
        for name in self.checkpoints:
            digest.update(name.encode())
            for segment in self.segments(name):
                digest.update(segment.name.encode())
                counts = segment.committed_counts()
                digest.update(np.where(counts > 0, segment.checksum_records(), 0).astype(np.uint64).tobytes())
        return digest.hexdigest()

    # -- how the rows were checked -----------------------------------------------------------------
    def record_checks(
        self,
        coverage: dict[str, Any] | None = None,
        verification: dict[str, Any] | None = None,
        checkpoint: str | None = None,
    ) -> None:
        """Record the logger's parameter coverage and a checkpoint's first-batch exactness check (root attribute
        ``checks``: ``{"coverage": {...}, "verification": {checkpoint: {...}}}``), shown by ``gradstore info``."""
        self._require_writable()
        checks = dict(self.checks())
        if coverage is not None:
            checks["coverage"] = coverage
        if verification is not None and checkpoint is not None:
            checks["verification"] = {**checks.get("verification", {}), checkpoint: verification}
        if checks != self.checks():
            self.root.attrs["checks"] = checks

    def checks(self) -> dict[str, Any]:
        """What :meth:`record_checks` recorded (``{}`` for a store logged before checks were recorded)."""
        checks = self.root.attrs.get("checks", {})
        return checks if isinstance(checks, dict) else {}

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, D={self.dim}, dtype={self.dtype}, checkpoints={self.checkpoints})"


def _read_meta(root: zarr.Group, path: StorePath) -> dict:
    meta = root.attrs.get("gradstore")
    if not isinstance(meta, dict):
        raise StoreFormatError(f"{path} is a Zarr group but not a gradstore store (no 'gradstore' attribute)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(f"{path}: store format version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        spec = ProjectionSpec.from_dict(meta["projection"])
        dtype, chunk_rows = str(meta["dtype"]), int(meta["chunk_rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreFormatError(f"{path}: malformed store metadata ({exc})") from exc
    if dtype not in DTYPES or chunk_rows < 1 or meta.get("dim") != spec.dim:
        raise StoreFormatError(
            f"{path}: inconsistent store metadata (dtype={dtype}, chunk_rows={chunk_rows}, dim={meta.get('dim')})"
        )
    return {"spec": spec, "dtype": dtype, "chunk_rows": chunk_rows}
