"""Random access to a checkpoint's committed rows by example id, reading each touched Zarr chunk once.

A chunk that only a few of the wanted rows live in is not read whole: its chunks are uncompressed row-major
bytes, so those rows are fetched as byte ranges through the Zarr store (a row is ``D * itemsize`` bytes of a
``chunk_rows * D * itemsize`` chunk), which is what makes re-reading an approximate index's candidates cheap.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import DuplicateIdError, UnknownExampleError
from .gradient_store import GradientStore

# Below this many wanted rows in a chunk, fetch them as byte ranges instead of reading the whole chunk.
RANGED_ROWS_PER_CHUNK = 8


def _raw_row_dtype(array: zarr.Array) -> np.dtype | None:
    """The on-disk dtype of a row if ``array``'s chunks are plain row-major bytes (no compression or filters)."""
    metadata = array.metadata
    codecs = getattr(metadata, "codecs", None)
    if getattr(metadata, "zarr_format", None) != 3 or not codecs or len(codecs) != 1:
        return None
    if not isinstance(codecs[0], BytesCodec):
        return None
    if array.order != "C" or getattr(array.store_path, "store", None) is None:
        return None
    endian = codecs[0].endian.value if codecs[0].endian is not None else sys.byteorder
    return np.dtype(array.dtype).newbyteorder("<" if endian == "little" else ">")


def _read_local(root: Path, keys: list[str], offsets: list[int], row_bytes: int) -> bytes | None:
    """The rows at ``offsets`` of the chunk files ``keys`` under ``root``, one ``os.preadv`` each (a local store:
    about 10 us a row where Zarr's partial reads take about 0.5 ms); None if a file is missing or short."""
    out = bytearray(len(keys) * row_bytes)
    view = memoryview(out)
    fds: dict[str, int] = {}
    try:
        for i, (key, offset) in enumerate(zip(keys, offsets, strict=True)):
            if key not in fds:
                fds[key] = os.open(root / key, os.O_RDONLY)
            if os.preadv(fds[key], [view[i * row_bytes : (i + 1) * row_bytes]], offset) != row_bytes:
                return None
    except FileNotFoundError:
        return None
    finally:
        for fd in fds.values():
            os.close(fd)
    return bytes(out)


def _read_ranged(array: zarr.Array, dtype: np.dtype, rows: np.ndarray) -> np.ndarray | None:
    """Rows of a row-chunked 2-D array as byte-range reads; None if a chunk is missing (never written)."""
    chunk_rows, dim = array.chunks[0], array.shape[1]
    row_bytes = dim * dtype.itemsize
    prefix = array.store_path.path
    store = array.store_path.store
    if isinstance(store, LocalStore):
        keys, offsets = [], []
        for row in rows.tolist():
            chunk, offset = divmod(row, chunk_rows)
            key = array.metadata.encode_chunk_key((chunk, 0))
            keys.append(f"{prefix}/{key}" if prefix else key)
            offsets.append(offset * row_bytes)
        data = _read_local(Path(store.root), keys, offsets, row_bytes)
        return None if data is None else np.frombuffer(data, dtype=dtype).reshape(len(rows), dim)
    requests = []
    for row in rows.tolist():
        chunk, offset = divmod(row, chunk_rows)
        key = array.metadata.encode_chunk_key((chunk, 0))
        byte_range = RangeByteRequest(offset * row_bytes, (offset + 1) * row_bytes)
        requests.append((f"{prefix}/{key}" if prefix else key, byte_range))
    buffers = sync(array.store_path.store.get_partial_values(default_buffer_prototype(), requests))
    if any(b is None or len(b) != row_bytes for b in buffers):
        return None
    return np.frombuffer(b"".join(b.to_bytes() for b in buffers if b is not None), dtype=dtype).reshape(len(rows), dim)


class CheckpointRows:
    """Where every committed row of one checkpoint lives (segment, row), addressable by example id."""

    def __init__(self, store: GradientStore, checkpoint: str):
        self.store, self.checkpoint = store, checkpoint
        self.segments = store.segments(checkpoint)
        ids, segment_of, row_of, sums = [], [], [], []
        self._counts = [segment.committed_counts() for segment in self.segments]
        for s, segment in enumerate(self.segments):
            checksums = segment.checksum_records()
            for start, stop in segment.row_ranges(self._counts[s]):
                ids.append(np.asarray(segment.ids_array[start:stop]))
                segment_of.append(np.full(stop - start, s, dtype=np.int32))
                row_of.append(np.arange(start, stop, dtype=np.int64))
                sums.append(checksums[np.arange(start, stop) // store.chunk_rows])
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        row_sums = np.concatenate(sums) if sums else np.zeros(0, np.uint64)
        segment_of_all = np.concatenate(segment_of) if segment_of else np.zeros(0, np.int32)
        row_of_all = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)
        order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[order]
        if len(self.sorted_ids) and (np.diff(self.sorted_ids) == 0).any():
            dup = self.sorted_ids[1:][np.diff(self.sorted_ids) == 0]
            raise DuplicateIdError(f"checkpoint {checkpoint!r} holds example ids more than once: {dup[:10].tolist()}")
        self._segment = segment_of_all[order]
        self._row = row_of_all[order]
        self._checksum = row_sums[order]  # of the chunk each row was committed in: its content's fingerprint
        self._grads: dict[int, zarr.Array] = {}  # opened once per segment: the re-rank reads a few rows per query

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def content_digest(self, ids: np.ndarray) -> str:
        """A hash of what this checkpoint holds for ``ids``: which of them have a row, and the checksum of the chunk
        each row was committed in (ids and gradients). Equal digests, equal rows: a part built from them still
        holds; a re-logged, re-captured or rewritten row changes it, whatever its id."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), max(len(self.sorted_ids) - 1, 0))
        present = self.sorted_ids[pos] == ids if len(self.sorted_ids) else np.zeros(len(ids), bool)
        digest = hashlib.blake2b(ids.tobytes(), digest_size=16)
        digest.update(present.tobytes())
        digest.update(np.ascontiguousarray(self._checksum[pos[present]]).tobytes())
        return digest.hexdigest()

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.sorted_ids, ids)
        pos = np.minimum(pos, max(len(self.sorted_ids) - 1, 0))
        hit = self.sorted_ids[pos] == ids if len(self.sorted_ids) else np.zeros(len(ids), bool)
        if not hit.all():
            missing = ids[~hit]
            raise UnknownExampleError(
                f"checkpoint {self.checkpoint!r} has no committed row for ids {missing[:10].tolist()}"
            )
        return pos

    def read_or_zero(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Like :meth:`read`, with zero rows for ids this checkpoint has no row for."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), max(len(self.sorted_ids) - 1, 0))
        present = self.sorted_ids[pos] == ids if len(self.sorted_ids) else np.zeros(len(ids), bool)
        if present.all():
            return self.read(ids)
        out = np.zeros((len(ids), self.store.dim), dtype=self.store.dtype)
        if present.any():
            out[present] = self.read(ids[present])
        return out

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``[n, D]`` (store dtype) for the given ids, in their order."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._locate(ids)
        segments, rows = self._segment[pos], self._row[pos]
        out = np.empty((len(ids), self.store.dim), dtype=self.store.dtype)
        chunk_rows = self.store.chunk_rows
        for s in np.unique(segments):
            in_segment = np.flatnonzero(segments == s)
            if int(s) not in self._grads:
                self._grads[int(s)] = self.segments[int(s)].grads_array
            grads = self._grads[int(s)]
            chunks = rows[in_segment] // chunk_rows
            unique_chunks, per_chunk = np.unique(chunks, return_counts=True)
            raw_dtype = _raw_row_dtype(grads)
            if raw_dtype is not None:  # sparse chunks: byte ranges, one batched request
                sparse = np.isin(chunks, unique_chunks[per_chunk < RANGED_ROWS_PER_CHUNK])
                if sparse.any():
                    sel = in_segment[sparse]
                    ranged = _read_ranged(grads, raw_dtype, rows[sel])
                    if ranged is not None:
                        out[sel] = ranged
                        unique_chunks = np.unique(chunks[~sparse])
            for chunk in unique_chunks:
                sel = in_segment[chunks == chunk]
                lo = int(chunk) * chunk_rows
                counts = self._counts[int(s)]  # whole committed chunks are read verified against their checksum
                _, block = self.segments[int(s)].read_rows(lo, lo + int(counts[chunk]), counts=counts)
                out[sel] = block[rows[sel] - lo]
        return out
