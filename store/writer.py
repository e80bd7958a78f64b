"""Turning a stream of gradient rows into whole-chunk writes, off the training thread."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .gradient_store import Segment

# Rows per chunk when the caller does not say: chunks of about this many bytes (a power of two of rows, at most
# MAX_CHUNK_ROWS). A chunk is written whole, so a partly filled one (a short pass, the last rows of a capture) costs
# at most this much padding on disk and in memory, whatever the dimension.
CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 8
MAX_CHUNK_ROWS = 1024


def chunk_rows_for(dim: int, dtype: str, target_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk for rows of ``dim`` values of ``dtype``: the largest power of two whose chunk holds at most
    ``target_bytes``, within ``[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]`` (each chunk also costs a few small files: its ids,
    checksum, fingerprint and commit record, so very short chunks make writing slower)."""
    row = max(1, int(dim) * np.dtype(dtype).itemsize)
    rows = max(1, target_bytes // row)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 1 << (rows.bit_length() - 1))))


class BackgroundWriter:
    """Runs chunk writes (and the conversion of rows before them) on one worker thread, at most ``max_pending``
    queued, re-raising failures on a later :meth:`submit` or :meth:`flush` of the submitting thread.

    One thread keeps writes ordered; the bound keeps memory flat when storage is slower than compute. A task that
    submits more work from the worker thread runs it there at once (in order, without queueing behind itself).
    """

    def __init__(self, max_pending: int = 4, synchronous: bool = False):
        self._worker: int | None = None
        self._pool = (
            None
            if synchronous
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradstore-writer", initializer=self._started)
        )
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def _started(self) -> None:
        self._worker = threading.get_ident()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._pool is None or threading.get_ident() == self._worker:
            fn()
            return
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._max_pending):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn))

    def flush(self) -> None:
        """Wait for every queued write; raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


class ChunkBuffer:
    """Collects rows for one chunk of a segment and writes the chunk when it is full (or on :meth:`flush`)."""

    def __init__(
        self,
        segment: Segment,
        chunk: int,
        rows: int,
        dim: int,
        dtype: str,
        writer: BackgroundWriter,
        fingerprint: int = 0,
    ):
        self.segment, self.chunk, self.rows, self.writer, self.fingerprint = segment, chunk, rows, writer, fingerprint
        self.ids = np.empty(rows, dtype=np.int64)
        self.grads = np.empty((rows, dim), dtype=dtype)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == self.rows

    def add(self, ids: np.ndarray, grads: np.ndarray) -> int:
        """Append as many rows as fit; return how many were taken."""
        take = min(len(ids), self.rows - self.filled)
        self.ids[self.filled : self.filled + take] = ids[:take]
        self.grads[self.filled : self.filled + take] = grads[:take]
        self.filled += take
        if self.full:
            self.flush()
        return take

    def flush(self) -> None:
        if self.filled == 0:
            return
        segment, chunk, ids, grads = self.segment, self.chunk, self.ids[: self.filled], self.grads[: self.filled]
        fingerprint = self.fingerprint
        self.writer.submit(lambda: segment.write_chunk(chunk, ids, grads, fingerprint))
        self.ids, self.grads, self.filled = np.empty(0, np.int64), np.empty((0, grads.shape[1]), grads.dtype), 0
        self.rows = 0


class AppendWriter:
    """Appends rows to a checkpoint through capture segments owned by this writer alone."""

    def __init__(self, store, checkpoint: str, writer_tag: str, background: BackgroundWriter):
        self.store, self.checkpoint, self.writer_tag, self.background = store, checkpoint, writer_tag, background
        self._segment: Segment | None = None
        self._next_chunk = 0
        self._buffer: ChunkBuffer | None = None
        self._skipped: set[int] = set()

    def _new_buffer(self) -> ChunkBuffer:
        if self._segment is None or self._next_chunk == self._segment.n_chunks:
            if self._segment is not None:  # full: every chunk of it is committed once the queued writes are
                self._record_flushed()
            self._segment, self._next_chunk = self.store.new_capture_segment(self.checkpoint, self.writer_tag), 0
        buffer = ChunkBuffer(
            self._segment, self._next_chunk, self.store.chunk_rows, self.store.dim, self.store.dtype, self.background
        )
        self._next_chunk += 1
        return buffer

    def append(self, ids: np.ndarray, grads: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            if self._buffer is None or self._buffer.rows == 0:
                self._buffer = self._new_buffer()
            start += self._buffer.add(ids[start:], grads[start:])

    def skip(self, ids: np.ndarray) -> None:
        """Record examples whose training step was skipped (e.g. by a GradScaler): zero rows at this checkpoint."""
        self._skipped.update(int(i) for i in ids)

    def flush(self) -> None:
        """Commit a partly filled chunk (later rows go to the next chunk) and the skipped ids recorded so far, and
        record how many chunks of the segment are committed (a later missing commit record is then damage)."""
        if self._buffer is not None:
            self._buffer.flush()
        if self._skipped and self._segment is None:
            self._segment, self._next_chunk = self.store.new_capture_segment(self.checkpoint, self.writer_tag), 0
        if self._segment is not None:
            self._record_flushed()

    def _record_flushed(self) -> None:
        """Queue, after the chunk writes already queued, the segment's committed chunk count and skipped ids."""
        segment, chunks, skipped = self._segment, self._next_chunk, self._skipped
        assert segment is not None
        self._skipped = set()
        self.background.submit(lambda: segment.record_flushed(chunks, skipped))
