"""A flat index's part files: one ``.npy`` of ``[rows, D]`` vectors (one checkpoint, one row range) in the store's
dtype, written block by block and read back by byte offset through a descriptor opened once.

A streamed scan reads a file through a read-only shared map of it (:meth:`PartFile.mapped`): the rows are scored
straight from the page cache, with no copy into a buffer first (that copy cost as much as the read itself,
benchmarks/flat_scan.py). The pages are the kernel's page cache, reclaimable and never written, so they are no
part of the process's data (``RLIMIT_DATA``) whatever the file's size; where a map cannot be made (an
``RLIMIT_AS`` too small) the scan reads bounded pieces with ``preadv`` instead. The map and the descriptor, both
made at load, keep reading the files of the snapshot they were opened on after an update swaps a new index
directory in.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DiskFullError, IndexMismatchError
from .remote import RemotePath

REBUILD_HINT = "rebuild it: `gradstore index --config ...` or GradientIndex.rebuild(path, store)"


def part_name(checkpoint: str, row_part: int) -> str:
    """The file of ``checkpoint``'s vectors of row part ``row_part``, relative to the index directory."""
    return f"vectors/{checkpoint}/part-{row_part:05d}.npy"


class PartWriter:
    """Writes ``rows`` vectors, given as float32 blocks in row order, into ``path`` as ``dtype``.

    Plain buffered writes, never a writable map: a full disk is an ``OSError`` here (:class:`DiskFullError`), not a
    SIGBUS when a mapped page cannot be stored. A float16 part whose values overflow float16 (a preconditioner that
    scales up, without normalisation) goes on in float32: what was written is read back, converted (exactly) and
    written again as float32, so no vector is infinite."""

    def __init__(self, path: Path, rows: int, dim: int, dtype: np.dtype):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rows, self.dim, self.at = path, rows, dim, 0
        self.dtype = np.dtype(dtype)
        self.file = self._start(self.dtype)

    def _start(self, dtype: np.dtype) -> BinaryIO:
        with disk_full_is_typed(self.path):
            file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": (self.rows, self.dim),
            }
            np.lib.format.write_array_header_1_0(file, header)
        return file

    def add(self, block: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            converted = block.astype(self.dtype)
        if not np.isfinite(converted).all():
            self._widen()
            converted = block.astype(np.float32)
        with disk_full_is_typed(self.path):
            self.file.write(np.ascontiguousarray(converted).tobytes())
        self.at += len(block)

    def _widen(self) -> None:
        self.file.close()
        written = self._read_written()  # the float16 rows so far, read back before the file is started again
        self.dtype = np.dtype(np.float32)
        self.file = self._start(self.dtype)
        with disk_full_is_typed(self.path):
            self.file.write(written.tobytes())

    def _read_written(self) -> np.ndarray:
        """The rows written so far, as float32."""
        with open(self.path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            data = f.read(self.at * self.dim * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.at, self.dim).astype(np.float32)

    def close(self) -> np.dtype:
        """Finish the file; returns the dtype written."""
        if self.at != self.rows:
            raise AssertionError(f"part {self.path} got {self.at} rows, {self.rows} expected")
        with disk_full_is_typed(self.path):
            self.file.close()
        return self.dtype


@contextlib.contextmanager
def disk_full_is_typed(path: Path | RemotePath) -> Iterator[None]:
    """A full disk (or quota) while writing ``path`` is a :class:`DiskFullError` saying what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(
            f"no space left on the device writing {path} ({exc.strerror}); free space and run the command again: "
            "an index is built aside and swapped in (the previous one is kept), logging resumes from committed chunks"
        ) from exc


class PartFile:
    """One part file opened for reading: ``rows`` vectors of ``dim`` values of ``dtype`` from byte ``offset``."""

    def __init__(self, path: Path, fd: int, rows: int, dim: int, dtype: np.dtype, offset: int):
        self.path, self.fd, self.rows, self.dim, self.dtype, self.offset = path, fd, rows, dim, dtype, offset
        self.row_bytes = dim * dtype.itemsize
        self._map: mmap.mmap | None = None
        self._mapped: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path) -> PartFile:
        fd = os.open(path, os.O_RDONLY)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
        except BaseException:
            os.close(fd)
            raise
        if fortran or len(shape) != 2:
            os.close(fd)
            raise ValueError(f"{path}: expected a C-order [rows, D] array, got shape {shape}")
        return cls(path, fd, int(shape[0]), int(shape[1]), np.dtype(dtype), offset)

    def check_size(self) -> None:
        """Refuse a file cut short since it was opened (a map read past its end would be a ``SIGBUS``): a scan
        checks every file it reads first."""
        if os.fstat(self.fd).st_size < self.offset + self.rows * self.row_bytes:
            raise IndexMismatchError(f"index part file {self.path} was truncated after it was opened; {REBUILD_HINT}")

    def mapped(self) -> np.ndarray | None:
        """Every row as a read-only ``[rows, D]`` array over the file's pages, mapped on first use and kept until
        :meth:`close`; None where the file cannot be mapped (then :meth:`read` it)."""
        if self._mapped is None and self.rows:
            try:
                self._map = mmap.mmap(self.fd, self.offset + self.rows * self.row_bytes, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                return None
            values = np.frombuffer(self._map, dtype=self.dtype, count=self.rows * self.dim, offset=self.offset)
            self._mapped = values.reshape(self.rows, self.dim)
        return self._mapped

    def read(self, lo: int, hi: int, buffer: bytearray | None = None) -> np.ndarray:
        """Rows ``lo .. hi`` in the stored dtype (one read), into ``buffer`` (reused by a scan) when given."""
        size = (hi - lo) * self.row_bytes
        if buffer is None or len(buffer) < size:
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        got = os.preadv(self.fd, [view], self.offset + lo * self.row_bytes)
        if got != size:
            raise IndexMismatchError(f"index part file {self.path} was truncated after it was opened; {REBUILD_HINT}")
        return np.frombuffer(view, dtype=self.dtype).reshape(hi - lo, self.dim)

    def read_file(self) -> bytearray:
        """The whole file (header and rows) in one read, as it is now (what a resident load checks and keeps)."""
        size = os.fstat(self.fd).st_size
        data = bytearray(size)
        got = os.preadv(self.fd, [memoryview(data)], 0)
        if got != size:
            raise IndexMismatchError(f"index part file {self.path} changed while it was read; {REBUILD_HINT}")
        return data

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, repeats allowed) in the stored dtype: byte-range reads of just those rows,
        one ``os.preadv`` per run of consecutive rows (a re-score's few hundred rows take well under a ms)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            raise IndexError(f"rows outside 0..{self.rows - 1} of index part file {self.path}")
        if rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():  # a run of rows: one read
            out[:] = self.read(int(rows[0]), int(rows[-1]) + 1)
            return out
        wanted, back = np.unique(rows, return_inverse=True)
        sorted_rows = np.empty((len(wanted), self.dim), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        flat = sorted_rows.view(np.uint8).reshape(len(wanted), self.row_bytes)
        for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(wanted)].tolist(), strict=True):
            first = int(wanted[lo])
            view = flat[lo:hi].data.cast("B")
            if os.preadv(self.fd, [view], self.offset + first * self.row_bytes) != len(view):
                raise IndexMismatchError(
                    f"index part file {self.path} was truncated after it was opened; {REBUILD_HINT}"
                )
        out[:] = sorted_rows[back.reshape(-1)]
        return out

    def close(self) -> None:
        self._mapped = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held (a scan on another thread): unmapped by GC
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
