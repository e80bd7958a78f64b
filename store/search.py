"""Search backends: one per index kind, chosen in one place (:data:`BACKENDS`).

A backend writes its files from streamed index vectors, loads them back, and proposes *candidate* rows for each
query's largest and smallest scores; :class:`~gradstore.store.index.GradientIndex` re-scores every candidate
exactly, so a backend only decides which rows are looked at.

* ``flat``: one file per checkpoint and row part in the store's dtype, scanned in float32 in bounded blocks (on the
  CPU straight from the files' read-only mapped pages, float16 widened in cache-sized pieces into the BLAS, on
  several threads; on the GPU, blocks copied to the device for torch matmul); its candidates are every row whose exact
  score may be among the top / bottom ``k`` given a rigorous bound on the float32 rounding (the exact ones, ties
  included, and rows within the margin of the ``k``-th), and it also yields mean / max ``|score|`` over every row
  (float32 sums: relative error about ``D 2^-24``).
* ``ivf``, ``hnsw``, ``ivfpq``, ``ivfsq``: ``faiss.index``; ``k * rerank`` approximate candidates per query.
  ``hnsw`` and (on CPU) ``ivf`` hold the exact float32 vectors and hand them to the re-scoring; ``ivfpq``,
  ``ivfsq`` (and a GPU ``ivf``) do not, and the index re-reads the candidates' rows from the store.
* ``on_disk`` (ivf / ivfsq / ivfpq): the inverted lists live in ``faiss.ivfdata`` (FAISS ``OnDiskInvertedLists``,
  memory-mapped read-only at load, so resident memory is the pages searches touch). The build trains on a sample
  read block by block, encodes each block into its own shard index and merges the shards into the lists file (the
  ``faiss.contrib.ondisk`` pattern), so no step holds more than the sample or one block.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, NamedTuple, Protocol, cast

import faiss
import numpy as np
import torch

from .blas import scanning
from .errors import IndexMismatchError, IndexOptionsError
from .index_options import IndexKind, IndexOptions
from .manifest import IndexManifest
from .parts import PartFile, PartWriter, part_name
from .scoring import PreparedQueries, as_prepared
from .vectors import VectorSource


class Candidates(NamedTuple):
    """Per query ``[B, m]`` rows to re-score for the largest and the smallest scores (``-1`` pads when fewer were
    found), and the mean / max ``|score|`` over all rows where the backend scored them all."""

    proponent_rows: np.ndarray
    opponent_rows: np.ndarray
    mean_abs_score: np.ndarray | None = None  # [B] float64
    max_abs_score: np.ndarray | None = None


class SearchBackend(Protocol):
    """One index kind: its files built from streamed vectors, loaded back, and searched for candidates."""

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        """Write this kind's files for the examples ``ids`` into ``directory``; return their ``[N, C]`` sqnorms."""
        ...

    @classmethod
    def load(
        cls,
        directory: Path,
        options: IndexOptions,
        device: torch.device,
        manifest: IndexManifest | None = None,
        label: Path | None = None,
    ) -> SearchBackend:
        """The backend of the files in ``directory``, with ``options``' search-time knobs; what it holds in memory
        is checked against ``manifest`` (default: the one in ``directory``) on the bytes it reads (``label``: the
        path messages name)."""
        ...

    @classmethod
    def verified_on_load(cls, manifest: IndexManifest) -> set[str]:
        """Files :meth:`load` reads whole and checks itself (the index's open need not hash them first)."""
        ...

    def candidates(self, queries: PreparedQueries | np.ndarray, k: int) -> Candidates:
        """Rows to re-score for each query's ``k`` largest and ``k`` smallest scores (prepared queries, or already
        prepared ``[B, C*D]`` ones)."""
        ...

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """The exact ``[n, C*D]`` float32 vectors of ``rows`` if this backend holds them, else None."""
        ...


# -- flat ------------------------------------------------------------------------------------------
class _Within:
    """Every row whose exact score may be among the ``k`` largest (or smallest) of its query, from float32 scores
    and a bound on their error: ``|approx - exact| <= err`` per row and query (:func:`_error_bound`).

    A row is kept when its upper bound (``approx + err``) reaches the ``k``-th largest lower bound (``approx -
    err``) over all rows: a row below it has ``k`` rows surely above it. So the exact top ``k`` (ties included:
    the index re-scores every candidate in float64 and breaks ties by id) is always among the candidates, whatever
    the float32 rounding; rows within the margin of the ``k``-th are re-scored too. Past :attr:`CAP` candidates of
    one query (a mass of rows tied to the ``k``-th, such as duplicates) those with the largest upper bounds are
    kept."""

    CAP: ClassVar[int] = 4096

    def __init__(self, largest: bool, k: int, queries: int, device: torch.device):
        self.sign, self.k = (1.0 if largest else -1.0), k
        self.floor = torch.full((0, queries), -torch.inf, dtype=torch.float64, device=device)  # best lower bounds
        self.rows: list[torch.Tensor] = []
        self.query: list[torch.Tensor] = []
        self.upper: list[torch.Tensor] = []
        self.held = 0

    def level(self) -> torch.Tensor:
        """``[B]``: the ``k``-th largest lower bound so far (-inf while fewer than ``k`` rows were seen)."""
        if len(self.floor) < self.k:
            return torch.full(self.floor.shape[1:], -torch.inf, dtype=torch.float64, device=self.floor.device)
        return self.floor[self.k - 1]

    def screen(self, scores: torch.Tensor, err_max: torch.Tensor) -> torch.Tensor | None:
        """``[n]``: whether each row of ``[n, B]`` float32 scores may matter to any query, given ``[B]`` float64
        bounds on every row's error (None: all may, fewer than ``k`` rows seen so far). A row matters when its upper
        bound may reach the level (``score >= level - err_max``: this also covers every row whose lower bound could
        raise the level); the comparison runs in float32 against the threshold rounded down, so it errs towards
        keeping. NaN scores and bounds are always kept."""
        if len(self.floor) < self.k:
            return None
        threshold = self.level() - err_max
        threshold = torch.where(threshold.isnan(), -torch.inf, threshold)
        low = threshold.float()
        low = torch.where(low.double() > threshold, torch.nextafter(low, torch.full_like(low, -torch.inf)), low)
        passed = scores >= low if self.sign > 0 else scores <= -low
        return (passed | scores.isnan()).any(1)

    def add(self, scores: torch.Tensor, err: torch.Tensor, rows: int | torch.Tensor) -> None:
        """``[n, B]`` float32 scores and ``[n, B]`` float64 error bounds of rows ``rows .. rows + n`` (or of the
        ``[n]`` rows ``rows``)."""
        signed = scores.double() if self.sign > 0 else -scores.double()
        lower, upper = signed - err, signed + err
        if scores.isnan().any() or err.isnan().any():
            # a non-finite score (bytes changed since load) is always a candidate: the re-score sees and refuses it
            lower = torch.where(lower.isnan(), -torch.inf, lower)
            upper = torch.where(upper.isnan(), torch.inf, upper)
        best = lower.topk(min(self.k, len(lower)), dim=0).values
        merged = torch.cat([self.floor, best])
        self.floor = merged.topk(min(self.k, len(merged)), dim=0).values
        kept, query = (upper >= self.level()[None, :]).nonzero(as_tuple=True)
        self.rows.append(kept + rows if isinstance(rows, int) else rows[kept])
        self.query.append(query)
        self.upper.append(upper[kept, query])
        self.held += len(kept)
        if self.held > 4 * self.CAP * max(1, len(self.floor[0])):  # many near the level so far: drop those below
            self._prune()

    def _prune(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, query, upper = torch.cat(self.rows), torch.cat(self.query), torch.cat(self.upper)
        keep = upper >= self.level()[query]
        rows, query, upper = rows[keep], query[keep], upper[keep]
        self.rows, self.query, self.upper, self.held = [rows], [query], [upper], len(rows)
        return rows, query, upper

    def candidates(self) -> np.ndarray:
        """``[B, m]`` rows of each query (``-1`` pads), at most :attr:`CAP` of them."""
        b = self.floor.shape[1]
        if not self.rows:
            return np.full((b, 0), -1, dtype=np.int64)
        rows, query, upper = (t.cpu().numpy() for t in self._prune())
        order = np.lexsort((-upper, query))  # by query, largest upper bound first
        rows, query = rows[order], query[order]
        counts = np.bincount(query, minlength=b)
        out = np.full((b, min(max(int(counts.max()), 1), self.CAP)), -1, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for j in range(b):
            picked = rows[first[j] : first[j] + min(counts[j], self.CAP)]
            out[j, : len(picked)] = picked
        return out


class _Extremes:
    """Both ends of every query (:class:`_Within` largest and smallest) over blocks of float32 scores, with the
    rigorous error bounds (:func:`_error_bound`) worked out only for the rows that may matter: a block's rows are
    first screened against each end's level with one bound for the whole block (from its largest row norms), so
    past the first ``k`` rows a block costs a comparison per score."""

    def __init__(self, k: int, query_norms: torch.Tensor, dim: int, device: torch.device):
        queries = query_norms.shape[1]
        self.top, self.bottom = _Within(True, k, queries, device), _Within(False, k, queries, device)
        self.query_norms, self.dim, self.unit = query_norms.double(), dim, _unit_roundoff(device)

    def add(self, scores: torch.Tensor, norms: torch.Tensor, start: int) -> None:
        """Rows ``start .. start + n``: ``[n, B]`` float32 scores, ``[n, C']`` norms of the scored checkpoints
        (or bounds on them)."""
        norms = norms.to(scores.device)
        if len(norms) and norms.shape[1]:
            largest = norms.max(0).values[None, :]  # NaN stays NaN: then every row is kept
            err_max = _error_bound(largest, self.query_norms, self.dim, self.unit)[0]
        else:
            err_max = torch.zeros(scores.shape[1], dtype=torch.float64, device=scores.device)
        screens = [end.screen(scores, err_max) for end in (self.top, self.bottom)]
        if screens[0] is None or screens[1] is None:
            rows: int | torch.Tensor = start
        else:
            picked = (screens[0] | screens[1]).nonzero().squeeze(1)
            if not len(picked):
                return
            scores, norms, rows = scores[picked], norms[picked], picked + start
        err = _error_bound(norms, self.query_norms, self.dim, self.unit)
        self.top.add(scores, err, rows)
        self.bottom.add(scores, err, rows)

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """``([B, m], [B, m'])``: each query's candidate rows at the top and at the bottom (``-1`` pads)."""
        return self.top.candidates(), self.bottom.candidates()


def _unit_roundoff(device: torch.device) -> float:
    """The unit roundoff of a float32 matmul on ``device``: 2^-24, or TF32's / bfloat16's on a GPU allowed them."""
    if device.type == "cpu":
        return 2.0**-24
    return {"highest": 2.0**-24, "high": 2.0**-11}.get(torch.get_float32_matmul_precision(), 2.0**-8)


def _error_bound(norms: torch.Tensor, query_norms: torch.Tensor, dim: int, unit: float) -> torch.Tensor:
    """``[n, B]`` float64 bound on ``|float32 score - float64 score|`` of rows with per-checkpoint norms ``[n, C']``
    (at least the rows' 2-norms) against queries with per-checkpoint norms ``[C', B]``, over the ``C'`` scored
    checkpoints: any float32 sum of the ``C' D`` products errs by at most ``gamma_(C'D+C') sum |r_d q_d| <=
    gamma sum_c |r_c| |q_c|`` (Cauchy-Schwarz); the float64 re-score's own error is added, and 1% besides. Row
    norms summed in float32 may be low by ``(D + 4) 2^-23`` of themselves: allowed for."""
    n = norms.shape[1] * (dim + 1)
    gamma = 1.01 * (n * unit / (1 - n * unit) + n * 2.0**-52) * (1 + (dim + 4) * 2.0**-23)
    return (norms.double() @ query_norms.double()) * gamma


# float32 bytes of float16 rows widened at a time (a whole 1 MiB piece: fewer calls measured ~10-15% faster than
# 256 KiB-1 MiB, benchmarks/flat_scan.py); the widened rows are scored while they are in cache
_CONVERT_BYTES = 2 << 20
_WIDE = threading.local()  # per thread: the reused float32 buffer float16 pieces are widened into


def _wide_buffer(rows: int, dim: int) -> torch.Tensor:
    buffer = getattr(_WIDE, "buffer", None)
    if buffer is None or buffer.shape[1] != dim or buffer.shape[0] < rows:
        buffer = _WIDE.buffer = torch.empty((rows, dim), dtype=torch.float32)
    return buffer


def _product_buffer(rows: int, queries: int) -> np.ndarray:
    product = getattr(_WIDE, "product", None)
    if product is None or product.shape[1] != queries or product.shape[0] < rows:
        product = _WIDE.product = np.empty((rows, queries), dtype=np.float32)
    return product


def _cpu_scores(
    block: np.ndarray | torch.Tensor,
    queries: np.ndarray,
    out: np.ndarray | None = None,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """``[n, B]`` float32 scores of a block of stored rows against ``[D, B]`` queries, added to ``out`` when given;
    with ``norms`` (``[n]``), the rows' 2-norms (float32 sums, no copy of the block: :func:`_error_bound`) too.

    Products run in numpy's BLAS (:mod:`.blas`: much faster than torch's CPU matmul for a few query columns; a
    scan sets its threads first). Float32 rows go straight to it. Float16 rows are never widened as a block: each
    cache-sized piece is widened by torch (F16C) into one reused float32 buffer (per thread, never reallocated) and
    scored while it is in cache, so no float32 block is written to memory and read back (benchmarks/flat_scan.py
    compares the scan with the read bound). ``block`` may be a view of a part file's
    mapped pages: read, never written."""
    if out is None:
        out = np.zeros((len(block), queries.shape[1]), dtype=np.float32)
    rows = block if isinstance(block, torch.Tensor) else torch.from_numpy(block)
    if rows.dtype == torch.float32:
        out += rows.numpy() @ queries
        if norms is not None:
            norms[:] = torch.linalg.vector_norm(rows, dim=1).numpy()
        return out
    count, dim = rows.shape
    piece_rows = max(1, min(_CONVERT_BYTES // (4 * dim), count))
    buffer = _wide_buffer(piece_rows, dim)
    product = _product_buffer(piece_rows, queries.shape[1])
    for lo in range(0, count, piece_rows):
        n = min(piece_rows, count - lo)
        wide = buffer[:n]
        wide.copy_(rows[lo : lo + n])
        out[lo : lo + n] += np.matmul(wide.numpy(), queries, out=product[:n])
        if norms is not None:
            norms[lo : lo + n] = torch.linalg.vector_norm(wide, dim=1).numpy()
    return out


def scan_threads(requested: int) -> int:
    """Threads of a streamed CPU scan: ``requested``, or (0) the CPUs this process may use divided by torch's
    intra-op threads (each scan thread's ops use that many), 1 to 4. A served process runs torch on one thread
    (:meth:`Run.serving_threads`), so it scans on every CPU: reading mapped pages, a second scan thread took a 2-core
    box's scan from 1.74x to 1.20x the one-thread read bound (benchmarks/flat_scan.py), while two scan threads each
    running two-thread ops measured slower than one; past 4 the memory bandwidth bounds it."""
    if requested > 0:
        return requested
    return max(1, min(usable_cpus() // max(torch.get_num_threads(), 1), 4))


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _runs(lo: int, hi: int, piece_rows: int, threads: int) -> list[tuple[int, int]]:
    """``lo .. hi`` cut into at most ``threads`` runs of whole pieces, as even as the pieces allow."""
    pieces = -(-(hi - lo) // piece_rows)
    n = max(1, min(threads, pieces))
    bounds = [lo + min(hi - lo, (pieces * i // n) * piece_rows) for i in range(n + 1)]
    return [(a, z) for a, z in itertools.pairwise(bounds) if z > a]


_READ = threading.local()  # per thread: the reused buffers stored pieces are read into, one per checkpoint


def _read_buffers(n: int) -> list[bytearray]:
    buffers = getattr(_READ, "buffers", None)
    if buffers is None or len(buffers) < n:
        buffers = _READ.buffers = [bytearray() for _ in range(n)]
    return buffers


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size: the scan threads besides the caller's, shared by every scan


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="flat-scan")
        return _POOLS[workers]


def _run_all(score: Callable[[tuple[int, int]], None], runs: list[tuple[int, int]], threads: int) -> None:
    """``score(run)`` for every run: the first in this thread, the others on the scan pool; returns when all are
    done (a failure is raised after every run stopped, so no thread still writes into the caller's scores)."""
    if len(runs) == 1:
        score(runs[0])
        return
    futures = [_pool(threads - 1).submit(score, run) for run in runs[1:]]
    try:
        score(runs[0])
    finally:
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()


class FlatBackend:
    """``flat``: per checkpoint and row part, a file of the vectors in the store's dtype (``vectors/<checkpoint>/
    part-<r>.npy``), scanned exactly in bounded blocks read from disk; resident memory is one block, the top-k
    heaps and the queries, whatever N. On the GPU the blocks stream to the device. An index whose float32 vectors
    fit ``resident_mb`` is instead read once and kept as float32 (on the search device), the fastest scan."""

    SCAN_BYTES: ClassVar[int] = 1 << 26  # float32 bytes of one checkpoint's block of rows scored per step
    PIECE_BYTES: ClassVar[int] = 1 << 20  # stored bytes of one checkpoint read and scored at a time (CPU)
    # threads that read and score a streamed block's pieces on the CPU (0: the CPUs, 1 to 4); the calling
    # thread is one of them
    SCAN_THREADS: ClassVar[int] = 0
    NORM_ROWS: ClassVar[int] = 64  # rows that share one bound on their norms (a streamed scan's error bounds)

    def __init__(
        self,
        starts: list[int],
        files: list[list[PartFile]],
        dim: int,
        device: torch.device,
        resident_bytes: int = 0,
        check: Callable[[PartFile, bytearray], None] | None = None,
    ):
        self.starts = starts  # first row of each row part
        self.files = files  # [row part][checkpoint]
        self.dim, self.device = dim, device
        self.num_rows = sum(f[0].rows for f in files) if files else 0
        # per checkpoint, per row part: the largest norm of every NORM_ROWS rows, measured by the first scan
        self._norms: dict[int, list[np.ndarray]] = {}
        self._held_norms: dict[tuple[int, int], torch.Tensor] = {}  # resident vectors' norms
        self._mapped: dict[tuple[int, int], torch.Tensor | None] = {}  # (row part, checkpoint): the file's pages
        self._map_lock = threading.Lock()
        # an index that fits the budget is read once, as float32, on the search device (the old, fastest scan);
        # ``check`` refuses bytes other than those the index was built with, so what is held was verified
        self.resident: list[list[torch.Tensor]] | None = None
        if self.fits(self.num_rows, len(files[0]) if files else 0, dim, resident_bytes):
            self.resident = [[self._whole(f, check) for f in row] for row in files]

    @staticmethod
    def fits(rows: int, checkpoints: int, dim: int, resident_bytes: int) -> bool:
        """Whether ``rows`` x ``checkpoints`` vectors of ``dim`` float32 fit the resident budget."""
        return rows * checkpoints * dim * 4 <= resident_bytes

    def _whole(self, part: PartFile, check: Callable[[PartFile, bytearray], None] | None) -> torch.Tensor:
        data = part.read_file()
        if check is not None:
            check(part, data)
        values = np.frombuffer(data, dtype=part.dtype, count=part.rows * part.dim, offset=part.offset)
        return torch.from_numpy(values.reshape(part.rows, part.dim)).to(self.device, dtype=torch.float32)

    @classmethod
    def write_parts(
        cls,
        source: VectorSource,
        ids: np.ndarray,
        row_part: int,
        directory: Path,
        dtype: np.dtype,
        block_rows: int,
        progress: bool,
    ) -> tuple[np.ndarray, dict[str, np.dtype]]:
        """Write the part files of ``ids`` (row part ``row_part``) for every checkpoint of ``source``; returns
        their ``[n, C]`` sqnorms and the dtype each part was written in."""
        names = list(source.rows)
        writers = [PartWriter(directory / part_name(name, row_part), len(ids), source.dim, dtype) for name in names]
        sqnorms = np.zeros((len(ids), len(names)))
        d = source.dim
        for block in source.blocks(ids, block_rows, f"indexing (flat, part {row_part})", progress):
            for j, writer in enumerate(writers):
                writer.add(block.vectors[:, j * d : (j + 1) * d])
            sqnorms[block.start : block.start + len(block.vectors)] = block.sqnorms
        return sqnorms, {name: writer.close() for name, writer in zip(names, writers, strict=True)}

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        """One row part of every checkpoint, in the stores' dtype (the index records the parts in its manifest)."""
        dtype = np.dtype(next(iter(source.rows.values())).store.dtype)
        return cls.write_parts(source, ids, 0, directory, dtype, options.block_rows, progress)[0]

    @classmethod
    def load(
        cls,
        directory: Path,
        options: IndexOptions,
        device: torch.device,
        manifest: IndexManifest | None = None,
        label: Path | None = None,
    ) -> FlatBackend:
        manifest = manifest if manifest is not None else IndexManifest.read(directory)
        shown = label if label is not None else directory
        files: list[list[PartFile]] = []
        names: dict[str, str] = {}  # part file path -> its name in the manifest
        for r, (start, stop) in enumerate(manifest.row_parts):
            row = []
            for name in manifest.checkpoints:
                file = manifest.part(name, r)["file"]
                row.append(PartFile.open(directory / file))
                names[str(row[-1].path)] = file
            if any(f.rows != stop - start or f.dim != manifest.dim for f in row):
                raise IndexMismatchError(f"index {shown}: a part file of rows {start}..{stop} has another shape")
            files.append(row)
        starts = [start for start, _ in manifest.row_parts]

        def check(part: PartFile, data: bytearray) -> None:
            manifest.check_bytes(names[str(part.path)], data, shown)

        return cls(starts, files, manifest.dim, device, resident_bytes=options.resident_mb << 20, check=check)

    @classmethod
    def verified_on_load(cls, manifest: IndexManifest) -> set[str]:
        width = len(manifest.checkpoints)
        if not cls.fits(manifest.num_rows, width, manifest.dim, manifest.options.resident_mb << 20):
            return set()
        return {part["file"] for part in manifest.parts if part.get("file")}

    def blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """``(row part, first global row, lo, hi)`` of every scanned block, in row order."""
        block_rows = max(1, self.SCAN_BYTES // (4 * self.dim))
        for r, (start, files) in enumerate(zip(self.starts, self.files, strict=True)):
            for lo in range(0, files[0].rows, block_rows):
                yield r, start, lo, min(lo + block_rows, files[0].rows)

    def _streamed(self, active: list[int]) -> Iterator[tuple[int, int, int, list[np.ndarray]]]:
        """The stored rows of every block (``(start, lo, hi, [one array per active checkpoint])``), read into
        reused buffers; the caller must be done with a block before it asks for the next (the GPU scan)."""
        buffers = [bytearray() for _ in active]
        for r, start, lo, hi in self.blocks():
            yield self._read_piece((r, start, lo, hi), active, buffers)

    def _score_pieces(
        self,
        r: int,
        block_lo: int,
        piece_rows: int,
        active: list[int],
        q_host: dict[int, np.ndarray],
        total: np.ndarray,
        norms: np.ndarray | None,
        run: tuple[int, int],
    ) -> None:
        """Score rows ``run`` (``lo, hi`` of row part ``r``) into ``total`` (the scores of the block starting at
        ``block_lo``), a piece of ``piece_rows`` rows at a time, straight from the files' mapped pages (or, where a
        file is not mapped, read into this thread's buffers); with ``norms``, write the rows' norms there too
        (``[rows, len(active)]``, float64)."""
        # pieces on a grid fixed by the block, not by the runs: a row's float32 score (its BLAS blocking) and so
        # every statistic is the same whatever the threads
        mapped = [self._mapped.get((r, c)) for c in active]
        buffers = _read_buffers(len(active))
        for lo in range(run[0], run[1], piece_rows):
            hi = min(lo + piece_rows, run[1])
            piece = total[lo - block_lo : hi - block_lo]
            piece[:] = 0
            for i, (c, rows) in enumerate(zip(active, mapped, strict=True)):
                if rows is None:  # not mapped: read into this thread's buffer
                    part = self.files[r][c]
                    if len(buffers[i]) < (hi - lo) * part.row_bytes:
                        buffers[i] = bytearray((hi - lo) * part.row_bytes)
                    stored: np.ndarray | torch.Tensor = part.read(lo, hi, buffers[i])
                else:
                    stored = rows[lo:hi]
                measured = None if norms is None else norms[lo - block_lo : hi - block_lo, i]
                _cpu_scores(stored, q_host[c], out=piece, norms=measured)

    def _read_piece(
        self, piece: tuple[int, int, int, int], active: list[int], buffers: list[bytearray]
    ) -> tuple[int, int, int, list[np.ndarray]]:
        r, start, lo, hi = piece
        arrays = []
        for i, c in enumerate(active):
            part = self.files[r][c]
            if len(buffers[i]) < (hi - lo) * part.row_bytes:
                buffers[i] = bytearray((hi - lo) * part.row_bytes)
            arrays.append(part.read(lo, hi, buffers[i]))
        return start, lo, hi, arrays

    def candidates(self, queries: PreparedQueries | np.ndarray, k: int) -> Candidates:
        """Every row that may be among the exact top and bottom ``k`` of each query (:class:`_Within`), and mean /
        max ``|score|`` over every row. Only the checkpoints the queries weight (:attr:`PreparedQueries.active`)
        are read and scored."""
        streamed = self.resident is None and self.device.type == "cpu"  # products on scan threads of its own
        with scanning() if streamed else contextlib.nullcontext():
            return self._scan(queries, k)

    def _scan(self, queries: PreparedQueries | np.ndarray, k: int) -> Candidates:
        d = self.dim
        prepared = as_prepared(queries, len(self.files[0]) if self.files else 0, d)
        b, active = prepared.num_queries, prepared.active.tolist()
        on_cpu = self.device.type == "cpu"
        q_host = {c: prepared.checkpoint(c) for c in active}  # [D, B]
        q_dev = None if on_cpu else {c: torch.from_numpy(q).to(self.device) for c, q in q_host.items()}
        abs_sum = torch.zeros(b, dtype=torch.float64, device=self.device)
        abs_max = torch.zeros(b, dtype=torch.float32, device=self.device)
        query_norms = torch.from_numpy(
            np.array([np.linalg.norm(q_host[c].astype(np.float64), axis=0) for c in active]).reshape(len(active), b)
        ).to(self.device)
        extremes = _Extremes(k, query_norms, d, self.device)

        def add(scores: torch.Tensor, first: int, norms: torch.Tensor) -> None:
            """A block's ``[n, B]`` float32 scores, its rows' ``[n, len(active)]`` norms (or bounds on them)."""
            nonlocal abs_max
            extremes.add(scores, norms, first)
            abs_scores = scores.abs()
            abs_sum.add_(abs_scores.sum(0, dtype=torch.float64))
            abs_max = torch.maximum(abs_max, abs_scores.max(0).values)

        if self.resident is not None:  # float32 in memory, on the search device
            for r, start, lo, hi in self.blocks():
                scores = torch.zeros((hi - lo, b), dtype=torch.float32, device=self.device)
                for c in active:
                    block = self.resident[r][c][lo:hi]
                    if on_cpu:
                        scores += torch.from_numpy(_cpu_scores(block.numpy(), q_host[c]))
                    else:
                        assert q_dev is not None
                        scores += block @ q_dev[c]
                norms = [self._resident_norms(r, c)[lo:hi] for c in active]
                add(scores, start + lo, torch.stack(norms, 1) if norms else torch.zeros((hi - lo, 0)))
        elif active and on_cpu:
            self.map_parts(active)
            # each block's rows are cut into runs of pieces, one run per scan thread; a thread reads each piece into
            # a cache-sized buffer of its own and scores it there at once, into the block's scores; the top-k
            # bounds and |score| sums run once per block, in this thread. The rows' norms (for the error bounds)
            # are measured on the first scan and kept as the largest of every NORM_ROWS rows
            piece_rows = max(1, self.PIECE_BYTES // max(f.row_bytes for f in self.files[0]))
            block_rows = max(1, self.SCAN_BYTES // (4 * d))
            total = np.empty((block_rows, b), dtype=np.float32)
            known = [self._norms.get(c) for c in active]
            measured = None if all(n is not None for n in known) else np.empty((block_rows, len(active)))
            fresh = (
                [np.zeros(-(-f[0].rows // self.NORM_ROWS)) for f in self.files for _ in active]
                if measured is not None
                else []
            )
            threads = scan_threads(self.SCAN_THREADS)
            for r, start, lo, hi in self.blocks():
                runs = _runs(lo, hi, piece_rows, threads)
                score = functools.partial(self._score_pieces, r, lo, piece_rows, active, q_host, total, measured)
                _run_all(score, runs, threads)
                if measured is not None:
                    row_norms = measured[: hi - lo]
                    chunk = np.arange(lo, hi) // self.NORM_ROWS
                    with np.errstate(invalid="ignore"):  # a NaN norm stays NaN: its rows are always candidates
                        for i in range(len(active)):
                            np.maximum.at(fresh[r * len(active) + i], chunk, row_norms[:, i])
                else:
                    row_norms = self._chunk_norms(r, active, lo, hi)
                add(torch.from_numpy(total[: hi - lo]), start + lo, torch.from_numpy(row_norms))
            if measured is not None:  # every row was read: keep the largest norm of every NORM_ROWS rows
                for i, c in enumerate(active):
                    self._norms[c] = [fresh[r * len(active) + i] for r in range(len(self.files))]
        elif active:
            for start, lo, hi, arrays in self._streamed(active):
                assert q_dev is not None
                scores = torch.zeros((hi - lo, b), dtype=torch.float32, device=self.device)
                norms = []
                for c, stored in zip(active, arrays, strict=True):
                    # synchronous copy: the host buffer is read into again for the next block
                    block = torch.from_numpy(stored).to(self.device).float()
                    scores += block @ q_dev[c]
                    norms.append(torch.linalg.vector_norm(block, dim=1))
                add(scores, start + lo, torch.stack(norms, 1))
        else:  # no weighted checkpoint: every score is 0
            for _, start, lo, hi in self.blocks():
                zeros = torch.zeros((hi - lo, b), dtype=torch.float32, device=self.device)
                add(zeros, start + lo, torch.zeros((hi - lo, 0), dtype=torch.float64))
        proponent_rows, opponent_rows = extremes.candidates()
        return Candidates(
            proponent_rows=proponent_rows,
            opponent_rows=opponent_rows,
            mean_abs_score=(abs_sum / max(self.num_rows, 1)).cpu().numpy(),
            max_abs_score=abs_max.double().cpu().numpy(),
        )

    def stored_rows(self, lo: int, hi: int, checkpoint: int) -> np.ndarray | torch.Tensor:
        """Rows ``lo .. hi`` (index rows, inside one row part) of checkpoint slot ``checkpoint``: a view of the
        resident float32 copy or of the file's mapped pages (stored dtype), else read (what batch scoring scans)."""
        r = int(np.searchsorted(self.starts, lo, side="right")) - 1
        start = self.starts[r]
        if not 0 <= lo - start <= hi - start <= self.files[r][checkpoint].rows:
            raise IndexError(f"rows {lo}..{hi} are not inside one row part of the index")
        if self.resident is not None:
            return self.resident[r][checkpoint][lo - start : hi - start]
        if (r, checkpoint) not in self._mapped:
            self.map_parts([checkpoint])
        mapped = self._mapped[r, checkpoint]
        if mapped is not None:
            return mapped[lo - start : hi - start]
        return self.files[r][checkpoint].read(lo - start, hi - start)

    def map_parts(self, active: list[int]) -> None:
        """Check that the part files of checkpoint slots ``active`` are whole and map the ones not mapped yet:
        what a scan does before its threads read them."""
        with self._map_lock:
            for r, files in enumerate(self.files):
                for c in active:
                    files[c].check_size()
                    if (r, c) not in self._mapped:
                        rows = files[c].mapped()
                        with warnings.catch_warnings():  # read-only pages: a scan reads them and never writes
                            warnings.simplefilter("ignore", UserWarning)
                            self._mapped[r, c] = None if rows is None else torch.from_numpy(rows)

    def _resident_norms(self, r: int, c: int) -> torch.Tensor:
        """``[rows]`` norms of row part ``r``'s resident vectors of checkpoint ``c`` (measured once)."""
        assert self.resident is not None
        if (r, c) not in self._held_norms:
            self._held_norms[r, c] = torch.linalg.vector_norm(self.resident[r][c], dim=1)
        return self._held_norms[r, c]

    def measure_norms(self, active: list[int]) -> None:
        """Measure, once, what a first scan measures: the largest norm of every NORM_ROWS rows of checkpoint slots
        ``active`` (widened as a scan widens them), so later scans bound their rounding error without widening rows
        twice (batch scoring's passes)."""
        todo = [c for c in active if c not in self._norms]
        if not todo or self.resident is not None:
            return
        self.map_parts(todo)
        for c in todo:
            bounds = []
            for r, files in enumerate(self.files):
                part, rows = files[c], self._mapped.get((r, c))
                norms = np.zeros(part.rows)
                step = max(1, _CONVERT_BYTES // (4 * self.dim))
                buffer = _wide_buffer(step, self.dim)
                for lo in range(0, part.rows, step):
                    hi = min(lo + step, part.rows)
                    stored = rows[lo:hi] if rows is not None else torch.from_numpy(part.read(lo, hi))
                    wide = buffer[: hi - lo]
                    wide.copy_(stored)
                    norms[lo:hi] = torch.linalg.vector_norm(wide, dim=1).numpy()
                starts = np.arange(0, part.rows, self.NORM_ROWS)
                bounds.append(np.maximum.reduceat(norms, starts) if part.rows else np.zeros(0))  # NaN stays NaN
            self._norms[c] = bounds

    def norm_bounds(self, lo: int, hi: int, active: list[int]) -> np.ndarray | None:
        """``[hi - lo, len(active)]`` bounds on the norms of index rows ``lo .. hi`` (inside one row part) from the
        measured ones (:meth:`measure_norms`, or a first scan's); None where they were not measured."""
        if self.resident is not None or any(c not in self._norms for c in active):
            return None
        r = int(np.searchsorted(self.starts, lo, side="right")) - 1
        return self._chunk_norms(r, active, lo - self.starts[r], hi - self.starts[r])

    def _chunk_norms(self, r: int, active: list[int], lo: int, hi: int) -> np.ndarray:
        """``[hi - lo, len(active)]``: each row's bound on its norm (the largest of its NORM_ROWS rows)."""
        chunk = np.arange(lo, hi) // self.NORM_ROWS
        return np.stack([self._norms[c][r][chunk] for c in active], 1)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The ``[n, C*D]`` float32 vectors of ``rows``: from the verified resident copy when there is one (the
        scores come from the bytes the scan used), else read from the part files."""
        rows = np.asarray(rows, dtype=np.int64)
        d = self.dim
        out = np.empty((len(rows), len(self.files[0]) * d if self.files else 0), dtype=np.float32)
        for r, (start, files) in enumerate(zip(self.starts, self.files, strict=True)):
            inside = (rows >= start) & (rows < start + files[0].rows)
            if not inside.any():
                continue
            local = rows[inside] - start
            if inside.all():  # every row in this part (a batch scorer's chunk): plain slices, no mask writes
                inside = slice(None)  # type: ignore[assignment]
            for c, f in enumerate(files):
                if self.resident is not None:
                    picked = self.resident[r][c][torch.from_numpy(local).to(self.resident[r][c].device)]
                    out[inside, c * d : (c + 1) * d] = picked.cpu().numpy()
                elif isinstance(inside, slice):  # widened by torch (F16C): numpy's float16 casts are ~20x slower
                    torch.from_numpy(out[:, c * d : (c + 1) * d]).copy_(torch.from_numpy(f.read_rows(local)))
                else:
                    out[inside, c * d : (c + 1) * d] = f.read_rows(local)
        return out

    def close(self) -> None:
        self._mapped.clear()
        for files in self.files:
            for f in files:
                f.close()


# -- FAISS -----------------------------------------------------------------------------------------
def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def index_to_gpus(index: faiss.Index) -> faiss.Index:
    """``index`` on the GPUs FAISS sees: one GPU holds a copy; several hold a shard of its rows each (FAISS's own
    ``index_cpu_to_all_gpus`` with ``shard=True``, searched as one ``IndexShards``), so an index that fits in the
    GPUs' memory together, not in one's, still searches on the devices."""
    gpus = faiss.get_num_gpus()
    if gpus == 1:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=gpus)


def ivf_nlist(options: IndexOptions, n: int) -> int:
    """Inverted lists of an ivf / ivfpq index over ``n`` rows: ``options.nlist``, else about ``4 sqrt(n)``
    (at most ``n / 39``: k-means wants 39 training points per centroid)."""
    return options.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))


def pq_subquantizers(dim: int, requested: int | None) -> int:
    """``pq_m`` for a ``dim``-wide ivfpq index: ``requested`` if it divides ``dim``, else the largest divisor of
    ``dim`` up to ``dim / 8``."""
    target = requested or max(1, dim // 8)
    if dim % target == 0:
        return target
    if requested:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        nearest = sorted(divisors, key=lambda m: abs(m - requested))[:3]
        raise IndexOptionsError(
            f"pq_m={requested} must divide the index dimension {dim} (checkpoints x D); "
            f"choose a divisor such as {sorted(nearest)}, or leave pq_m unset to pick one"
        )
    return max(m for m in range(1, target + 1) if dim % m == 0)


def training_sample(source: VectorSource, ids: np.ndarray, options: IndexOptions, progress: bool) -> np.ndarray:
    """``[min(N, train_rows), C*D]`` float32 vectors of a random sample of ``ids``, read block by block into one
    preallocated array (never the whole matrix, nor the sample twice)."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(ids, size=min(len(ids), options.train_rows), replace=False))
    out = np.empty((len(sample), source.width), dtype=np.float32)
    for block in source.blocks(sample, options.block_rows, f"training ({options.kind})", progress):
        out[block.start : block.start + len(block.vectors)] = block.vectors
    return out


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 around FAISS calls that ``printf`` progress (on-disk list resizing, the
    ``IO_FLAG_ONDISK_SAME_DIR`` path rewrite), which would otherwise corrupt a CLI's JSON on stdout."""
    with _STDOUT_LOCK:
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


ON_DISK_FILE = "faiss.ivfdata"
# Reading an index with on-disk lists: find the lists file beside the index (the build wrote it in a temporary
# directory that was then renamed) and map it read-only. Not IO_FLAG_MMAP: that includes IO_FLAG_SKIP_IVF_DATA,
# which leaves on-disk lists unopened (searching them then crashes).
ON_DISK_READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def add_on_disk(
    index: faiss.Index,
    source: VectorSource,
    ids: np.ndarray,
    options: IndexOptions,
    directory: Path,
    progress: bool,
    sqnorms: np.ndarray,
) -> None:
    """Add every row of ``ids`` to the trained, empty IVF ``index`` as on-disk lists in ``directory``: each block
    is encoded into a shard (a copy of the trained index) written to disk, then FAISS merges the shards' lists
    (memory-mapped) into ``faiss.ivfdata`` and the shards are deleted. Fills ``sqnorms``."""
    trained = faiss.serialize_index(index)
    shard_files = []
    for i, block in enumerate(source.blocks(ids, options.block_rows, f"indexing ({options.kind})", progress)):
        shard = faiss.deserialize_index(trained)
        rows = np.arange(block.start, block.start + len(block.vectors), dtype=np.int64)
        shard.add_with_ids(block.vectors, rows)
        shard_files.append(directory / f"shard-{i:06d}.index")
        faiss.write_index(shard, str(shard_files[-1]))
        del shard
        sqnorms[block.start : block.start + len(block.vectors)] = block.sqnorms
    # faiss.contrib.ondisk.merge_ondisk, keeping the shards owned so their mappings are released after the merge
    shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in shard_files]
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str((directory / ON_DISK_FILE).resolve()))
    parts = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # SWIG vector, not in the stubs
    for shard in shards:
        parts.push_back(faiss.extract_index_ivf(shard).invlists)
    with _quiet_stdout():
        ntotal = lists.merge_from_multiple(parts.data(), parts.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now (SWIG ownership)
    del parts, shards
    for f in shard_files:
        f.unlink()


class FaissBackend:
    """A FAISS index (``faiss.index``) proposing ``k * rerank`` approximate candidates per query.

    Subclasses say how their kind is created, which search-time knobs it takes, whether it may move to the GPU,
    and whether it holds the exact vectors.
    """

    FILE: ClassVar[str] = "faiss.index"
    USES_GPU: ClassVar[bool] = False  # copy to the GPU when faiss-gpu sees one

    def __init__(self, index: faiss.Index, searcher: faiss.Index, exact: faiss.Index | None, rerank: int):
        self.index = index  # the CPU index as loaded
        self.searcher = searcher  # what answers searches: ``index`` or its GPU copy
        self.exact = exact  # a CPU index holding the exact float32 vectors, if any
        self.rerank = rerank

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        raise NotImplementedError

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        """Set the search-time knobs."""

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        """``index`` if it can hand back the exact vectors of its rows (on the CPU), else None."""
        return None

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        n = len(ids)
        sqnorms = np.zeros((n, source.num_checkpoints))
        index = cls.new_index(options, source.width, n)
        if not index.is_trained:
            train = training_sample(source, ids, options, progress)
            index.train(train)
            del train
        if options.on_disk:
            add_on_disk(index, source, ids, options, directory, progress, sqnorms)
        else:
            for block in source.blocks(ids, options.block_rows, f"indexing ({options.kind})", progress):
                index.add(block.vectors)
                sqnorms[block.start : block.start + len(block.vectors)] = block.sqnorms
        faiss.write_index(index, str(directory / cls.FILE))
        return sqnorms

    @classmethod
    def load(
        cls,
        directory: Path,
        options: IndexOptions,
        device: torch.device,
        manifest: IndexManifest | None = None,
        label: Path | None = None,
    ) -> FaissBackend:
        if options.on_disk:  # the lists file is mapped, not read: the index's open checked it, the watch re-checks
            with _quiet_stdout():
                index = faiss.read_index(str(directory / cls.FILE), ON_DISK_READ_FLAGS)
        else:  # read once, checked, then deserialised: the index in memory is the one that was verified
            manifest = manifest if manifest is not None else IndexManifest.read(directory)
            data = manifest.verified_bytes(directory, cls.FILE, label)
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        cls.configure(index, options)
        searcher = index
        # on-disk lists stay on the CPU: a GPU copy would load every list into device memory
        if cls.USES_GPU and not options.on_disk and gpu_available():
            try:
                searcher = index_to_gpus(index)
            except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
                warnings.warn(f"FAISS GPU unavailable for this index ({exc}); searching on CPU", stacklevel=3)
        exact = cls.exact_storage(index) if searcher is index and not options.on_disk else None
        return cls(index, searcher, exact, options.rerank)

    @classmethod
    def verified_on_load(cls, manifest: IndexManifest) -> set[str]:
        return set() if manifest.options.on_disk else {cls.FILE}

    def candidates(self, queries: PreparedQueries | np.ndarray, k: int) -> Candidates:
        if isinstance(queries, PreparedQueries):
            queries = queries.concatenated()
        m = min(self.index.ntotal, k * self.rerank)
        _, proponents = self.searcher.search(queries, m)
        _, opponents = self.searcher.search(-queries, m)
        return Candidates(proponents, opponents)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        if self.exact is None:
            return None
        if not len(rows):
            return np.zeros((0, self.index.d), np.float32)
        return self.exact.reconstruct_batch(rows)


class HnswBackend(FaissBackend):
    """``hnsw``: a graph over the exact float32 vectors (CPU); ``ef_search`` trades latency for recall."""

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
        return index

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        cast(faiss.IndexHNSW, index).hnsw.efSearch = options.ef_search

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        return index


class IvfBackend(FaissBackend):
    """``ivf``: inverted lists of exact float32 vectors (IVFFlat); ``nprobe`` lists are visited per query."""

    USES_GPU = True

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFFlat(quantizer, dim, ivf_nlist(options, n), faiss.METRIC_INNER_PRODUCT)

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = options.nprobe or max(1, ivf.nlist // 4)

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct rows by id
        return index


class IvfPqBackend(IvfBackend):
    """``ivfpq``: inverted lists of product-quantised codes; the exact vectors are re-read from the store."""

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dim)
        nbits = int(np.clip(np.log2(max(n, 1) / 39), 4, 8))  # k-means wants >= 39 training points per centroid
        m = pq_subquantizers(dim, options.pq_m)
        return faiss.IndexIVFPQ(quantizer, dim, ivf_nlist(options, n), m, nbits, faiss.METRIC_INNER_PRODUCT)

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        return None


class IvfSqBackend(IvfBackend):
    """``ivfsq``: inverted lists of 8-bit scalar-quantised codes (a quarter of float32, half the float16 store);
    the exact vectors are re-read from the store."""

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFScalarQuantizer(
            quantizer, dim, ivf_nlist(options, n), faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        return None


# The one place an index kind is mapped to its implementation.
BACKENDS: dict[IndexKind, type[SearchBackend]] = {
    "flat": FlatBackend,
    "ivf": IvfBackend,
    "hnsw": HnswBackend,
    "ivfpq": IvfPqBackend,
    "ivfsq": IvfSqBackend,
}
