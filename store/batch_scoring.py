"""Batch scoring (issue 19 part 5, local path): many queries against every row of an index, exactly, without an
``N x M`` score matrix.

Queries are taken in blocks of ``block_queries``; for each block the index's rows stream by in chunks of
``chunk_rows`` (a flat index's rows straight from its part files' mapped pages, widened to float32 in cache-sized
pieces; other kinds' exact vectors: a FAISS kind's stored vectors or the store's rows), each chunk is scored in
float32 against the whole block (one BLAS product per checkpoint) exactly as the flat search scans, and every row
whose exact score may be among a query's best ``k`` either way is kept: the search's rigorous bound on the float32
rounding (:class:`~gradstore.store.search._Within`), so no near-tie is lost. A finished block's candidates are
re-scored with :meth:`Scoring.row_contributions` (the numbers a search reports, each row's from that row alone) and
ranked with ties broken by id, so a query's answer is what ``GradientIndex.search`` gives it, bit for bit. Mean
``|score|`` is a float64 sum of the float32 scores' magnitudes (relative error about ``D 2^-24``, as the search's);
max ``|score|`` is exact (the larger magnitude of the exact best and worst scores).

The work is split so that another engine can run it (:mod:`gradstore.store.ray_scoring`: Ray Data): a
:class:`BatchPlan` lists the blocks, :meth:`BatchPlan.scan` streams one block past one range of rows (anywhere the
index can be opened) and :meth:`BatchPlan.finish` merges a block's scans, in row order, and re-scores and writes it.
Chunks lie on one grid (multiples of ``chunk_rows``, also cut where a row part begins) whatever the ranges, so any
split of the rows scans the same chunks and writes the same bytes. Locally, blocks and row ranges run on a thread
pool (the BLAS and torch release the GIL): when there are fewer blocks than workers, each block's rows are split
into ranges too. Each
is written as one file in ``output`` (Parquet when pyarrow is installed, else JSON lines), atomically: a rerun with
the same queries skips the blocks already written (``_batch.json`` records what the files answer, so other queries
or another index are refused, not mixed in).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .blas import scanning
from .errors import IndexOptionsError
from .index import GradientIndex
from .scoring import PreparedQueries, Scoring
from .search import FlatBackend, _cpu_scores, _Extremes, usable_cpus

__all__ = ["BatchPlan", "BatchScoringSummary", "BlockScan", "read_batch", "row_ranges", "scan_rows", "score_batch"]

META = "_batch.json"
OutputFormat = Literal["auto", "parquet", "jsonl"]


@dataclass(frozen=True)
class BatchScoringSummary:
    """What :func:`score_batch` did."""

    output: Path
    files: list[Path]  # every block's file, in query order
    blocks_written: int
    blocks_skipped: int  # already written by an earlier run
    queries: int
    rows: int
    seconds: float
    bytes_scanned: int  # stored bytes of the rows read in this run (the checkpoints the queries weight)
    queries_scored: int  # queries of the blocks written in this run

    @property
    def pairs_per_second(self) -> float:
        """(query, row) scores per second in this run."""
        return self.queries_scored * self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        """Rows streamed per second in this run (each block streams every row once)."""
        return self.blocks_written * self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def blocks(self) -> int:
        return self.blocks_written + self.blocks_skipped


def _parquet_available() -> bool:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def row_ranges(index: GradientIndex, chunk_rows: int, parts: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ``[first, stop)`` row ranges covering the index: its shards' ranges (or ``parts`` equal ones),
    each boundary moved to the nearest multiple of ``chunk_rows`` (empty ranges dropped)."""
    n = index.num_rows
    if parts is not None:
        bounds = np.linspace(0, n, max(1, min(parts, n)) + 1)
    else:
        bounds = np.array([0, *(shard["rows"][0] for shard in index.manifest.shards[1:]), n], dtype=float)
    snapped = sorted({0, n, *(min(n, round(b / chunk_rows) * chunk_rows) for b in bounds[1:-1])})
    return [(lo, hi) for lo, hi in itertools.pairwise(snapped) if hi > lo]


def _chunks(index: GradientIndex, first: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Rows ``first .. stop`` in chunks on the grid: multiples of ``chunk_rows``, also cut where a row part begins
    (so a flat index's chunk is a slice of one part file)."""
    grid = range(-(-first // chunk_rows) * chunk_rows, stop, chunk_rows)
    parts = (start for start, _ in index.manifest.row_parts)
    cuts = sorted({first, stop, *grid, *(p for p in parts if first < p < stop)})
    return list(itertools.pairwise(cuts))


def _chunk_rows(index: GradientIndex, lo: int, hi: int, active: list[int]) -> list[np.ndarray | torch.Tensor]:
    """Rows ``lo .. hi`` of each checkpoint slot in ``active``: a flat index's stored rows in place, else exact
    float32 vectors."""
    backend = index.backend
    if isinstance(backend, FlatBackend):
        return [
            rows.cpu() if isinstance(rows, torch.Tensor) else rows
            for rows in (backend.stored_rows(lo, hi, c) for c in active)
        ]
    vectors = index.exact_vectors(np.arange(lo, hi))  # [n, C*D] float32
    d = index.dim
    return [vectors[:, c * d : (c + 1) * d] for c in active]


@dataclass
class BlockScan:
    """A block of queries streamed past rows ``first .. stop``: each query's candidate rows either way (``[Bq, m]``,
    ``-1`` pads; a superset of its exact best ``keep`` among these rows) and the ``|score|`` sum of every chunk in
    row order."""

    first: int
    proponent_rows: np.ndarray
    opponent_rows: np.ndarray
    abs_sums: np.ndarray  # [chunks, Bq]


def scan_rows(index: GradientIndex, q: np.ndarray, first: int, stop: int, chunk_rows: int, keep: int) -> BlockScan:
    """Stream rows ``first .. stop`` of ``index`` (chunks on the grid of ``chunk_rows``) past ``q`` (``[C*D, Bq]``
    prepared queries); checkpoint slots whose queries are all zero (weight 0) are not read."""
    with scanning():
        return _scan_rows(index, q, first, stop, chunk_rows, keep)


def _scan_rows(index: GradientIndex, q: np.ndarray, first: int, stop: int, chunk_rows: int, keep: int) -> BlockScan:
    d, bq = index.dim, q.shape[1]
    q32 = np.asarray(q, dtype=np.float32)
    active = [c for c in range(q32.shape[0] // d) if q32[c * d : (c + 1) * d].any()]
    per_checkpoint = {c: np.ascontiguousarray(q32[c * d : (c + 1) * d]) for c in active}
    norms_of_queries = np.array([np.linalg.norm(per_checkpoint[c].astype(np.float64), axis=0) for c in active])
    query_norms = torch.from_numpy(norms_of_queries.reshape(len(active), bq))
    if isinstance(index.backend, FlatBackend):
        index.backend.map_parts(active)  # whole files, mapped once
    extremes = _Extremes(keep, query_norms, d, torch.device("cpu"))
    abs_sums = []
    flat = index.backend if isinstance(index.backend, FlatBackend) else None
    for lo, hi in _chunks(index, first, stop, chunk_rows):
        scores = np.zeros((hi - lo, bq), dtype=np.float32)
        measured = flat.norm_bounds(lo, hi, active) if flat is not None else None  # else measure them here
        norms = measured if measured is not None else np.zeros((hi - lo, len(active)))
        for i, (c, rows) in enumerate(zip(active, _chunk_rows(index, lo, hi, active), strict=True)):
            _cpu_scores(rows, per_checkpoint[c], out=scores, norms=None if measured is not None else norms[:, i])
        extremes.add(torch.from_numpy(scores), torch.from_numpy(norms), lo)
        abs_sums.append(np.abs(scores).sum(0, dtype=np.float64))
    sums = np.array(abs_sums) if abs_sums else np.zeros((0, bq))
    return BlockScan(first, *extremes.candidates(), sums)


def _digest(index: GradientIndex, queries: PreparedQueries, k: int, block_queries: int, ids: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(queries.vectors).tobytes())
    h.update(np.ascontiguousarray(queries.weights, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(json.dumps([k, block_queries, index.num_rows, index.checkpoints, index.manifest.files]).encode())
    return h.hexdigest()


def _rank(
    index: GradientIndex, queries: PreparedQueries, q: int, candidates: np.ndarray, k: int, descending: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query ``q``'s exact top ``k`` among its candidates (``[m]`` rows, ``-1`` pads): (index rows, scores,
    ``[k, C]`` contributions)."""
    rows = np.unique(candidates[candidates >= 0])
    contributions = Scoring.row_contributions(queries, index.exact_vectors(rows), query=q)
    scores = contributions.sum(1)
    order = np.lexsort((index.ids[rows], -scores if descending else scores))[:k]
    return rows[order], scores[order], contributions[order]


def _write(path: Path, records: list[dict[str, Any]], fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    else:
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)  # a block's file is whole or absent


@dataclass
class BatchPlan:
    """What a batch scores and where it writes: the blocks, their files, those left to write, the settings."""

    index: GradientIndex
    queries: PreparedQueries
    out: Path
    k: int
    keep: int
    chunk_rows: int
    ids: np.ndarray
    fmt: str
    blocks: list[tuple[int, int]]
    files: list[Path]
    todo: list[int]
    vectors: np.ndarray  # [M, C*D] float32

    @property
    def rows(self) -> int:
        return self.index.num_rows

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes a scan reads per row: the weighted checkpoints' vectors."""
        return len(self.queries.active) * self.index.dim * np.dtype(self.index.store.dtype).itemsize

    @classmethod
    def make(
        cls,
        index: GradientIndex,
        queries: PreparedQueries,
        output: str | Path,
        k: int,
        query_ids: Sequence[Any] | np.ndarray | None,
        block_queries: int,
        chunk_rows: int | None,
        margin: int | None,
        output_format: OutputFormat,
    ) -> BatchPlan:
        """Check the arguments, record (or check) ``_batch.json`` in ``output`` and list the blocks to write."""
        m = queries.num_queries
        n = index.num_rows
        if k < 1 or block_queries < 1:
            raise IndexOptionsError(f"k and block_queries must be positive, got k={k}, block_queries={block_queries}")
        k = min(k, n)
        keep = min(n, k + (margin or 0))
        width = queries.vectors.shape[1] * queries.vectors.shape[2]
        chunk_rows = chunk_rows or max(1, (32 << 20) // (4 * width))
        ids = np.arange(m) if query_ids is None else np.asarray(query_ids)
        if len(ids) != m:
            raise IndexOptionsError(f"{len(ids)} query_ids for {m} queries")
        fmt = ("parquet" if _parquet_available() else "jsonl") if output_format == "auto" else output_format
        if fmt == "parquet" and not _parquet_available():
            raise IndexOptionsError("output_format='parquet' needs pyarrow: pip install pyarrow (or use 'jsonl')")
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "digest": _digest(index, queries, k, block_queries, ids),
            "format": fmt,
            "queries": m,
            "rows": n,
            "k": k,
        }
        if (out / META).is_file():
            recorded = json.loads((out / META).read_text())
            if recorded != meta:
                raise IndexOptionsError(
                    f"{out} holds the output of another batch (other queries, weights, k, blocks, format or index: "
                    f"{ {key: recorded.get(key) for key in meta if recorded.get(key) != meta[key]} }); "
                    "choose another output directory or remove it"
                )
        else:
            (out / META).write_text(json.dumps(meta))
        blocks = [(lo, min(lo + block_queries, m)) for lo in range(0, m, block_queries)]
        files = [out / f"part-{b:06d}.{fmt}" for b in range(len(blocks))]
        todo = [b for b, f in enumerate(files) if not f.is_file()]
        vectors = np.ascontiguousarray(queries.vectors.reshape(m, width), dtype=np.float32)
        return cls(index, queries, out, k, keep, chunk_rows, ids, fmt, blocks, files, todo, vectors)

    def scan(self, b: int, first: int, stop: int, index: GradientIndex | None = None) -> BlockScan:
        """Block ``b`` streamed past rows ``first .. stop`` (``index``: another process's copy of the index)."""
        lo, hi = self.blocks[b]
        q = np.ascontiguousarray(self.vectors[lo:hi].T)  # [C*D, Bq]
        return scan_rows(index or self.index, q, first, stop, self.chunk_rows, self.keep)

    def finish(self, b: int, scans: Sequence[BlockScan]) -> int:
        """Merge block ``b``'s scans (of consecutive row ranges from 0, on the chunk grid, in any order), re-score
        each query's survivors exactly, write the block's file; returns its number of queries."""
        lo, hi = self.blocks[b]
        bq, n, index = hi - lo, self.rows, self.index
        abs_sum = np.zeros(bq)
        ordered = sorted(scans, key=lambda part: part.first)
        for part in ordered:
            for chunk_sum in part.abs_sums:  # chunk by chunk in row order, whatever the ranges
                abs_sum += chunk_sum
        top = np.concatenate([part.proponent_rows for part in ordered], axis=1)
        bottom = np.concatenate([part.opponent_rows for part in ordered], axis=1)
        block = PreparedQueries(self.queries.vectors[lo:hi], self.queries.weights, self.queries.active)
        records = []
        for j in range(bq):
            pro = _rank(index, block, j, top[j], self.k, descending=True)
            opp = _rank(index, block, j, bottom[j], self.k, descending=False)
            query_id = self.ids[lo + j]
            records.append(
                {
                    "query": query_id.item() if isinstance(query_id, np.generic) else query_id,
                    "proponent_ids": index.ids[pro[0]].tolist(),
                    "proponent_scores": pro[1].tolist(),
                    "proponent_contributions": pro[2].tolist(),
                    "opponent_ids": index.ids[opp[0]].tolist(),
                    "opponent_scores": opp[1].tolist(),
                    "opponent_contributions": opp[2].tolist(),
                    "mean_abs_score": float(abs_sum[j] / max(n, 1)),
                    "max_abs_score": float(max(np.abs(pro[1][:1]).max(initial=0), np.abs(opp[1][:1]).max(initial=0))),
                    "checkpoints": index.checkpoints,
                }
            )
        _write(self.files[b], records, self.fmt)
        return bq

    def progress_bar(self, progress: bool) -> tqdm:
        m = self.queries.num_queries
        done = m - sum(self.blocks[b][1] - self.blocks[b][0] for b in self.todo)
        return tqdm(total=m, initial=done, desc="scoring", unit="query", disable=not progress)

    def summary(self, seconds: float) -> BatchScoringSummary:
        return BatchScoringSummary(
            output=self.out,
            files=self.files,
            blocks_written=len(self.todo),
            blocks_skipped=len(self.blocks) - len(self.todo),
            queries=self.queries.num_queries,
            rows=self.rows,
            seconds=seconds,
            bytes_scanned=len(self.todo) * self.rows * self.bytes_per_row,
            queries_scored=sum(self.blocks[b][1] - self.blocks[b][0] for b in self.todo),
        )


def score_batch(
    index: GradientIndex,
    queries: PreparedQueries,
    output: str | Path,
    k: int = 10,
    *,
    query_ids: Sequence[Any] | np.ndarray | None = None,
    block_queries: int = 256,
    chunk_rows: int | None = None,
    margin: int | None = None,
    workers: int | None = None,
    output_format: OutputFormat = "auto",
    progress: bool = True,
) -> BatchScoringSummary:
    """Score every query of ``queries`` against every row of ``index`` and write each query's exact top-``k``
    proponents and opponents (example ids, float64 scores, per-checkpoint contributions) and its mean / max
    ``|score|`` over all rows into ``output`` (a directory: one file per block of ``block_queries`` queries).

    ``queries``: :meth:`GradientIndex.prepare` of ``[M, C, D]`` raw query gradients and explicit ``[C]`` checkpoint
    weights (:class:`PreparedQueries`). ``query_ids``: what each output record names its query by (default
    ``0..M-1``). ``chunk_rows``: rows scored per step (default: about 32 MiB of float32 vectors). ``margin``:
    extra candidates re-scored per query beyond those that may be among its best ``k`` (default 0: the candidates
    are already rigorous). ``workers``: scans at once on a thread pool (default: the usable CPUs divided by torch's
    intra-op threads, which each scan's ops use), each a block of
    queries past all rows or, with fewer blocks than workers, past one range of rows. ``output_format``:
    ``parquet`` (needs pyarrow), ``jsonl``, or ``auto`` (Parquet when pyarrow is installed). A rerun with the same
    arguments skips the blocks already written; other queries, ``k``, blocks or another index are refused."""
    plan = BatchPlan.make(index, queries, output, k, query_ids, block_queries, chunk_rows, margin, output_format)
    started = time.perf_counter()
    if isinstance(index.backend, FlatBackend) and len(plan.todo) > 1:  # every pass then reuses the rows' norms
        index.backend.measure_norms(plan.queries.active.tolist())
    workers = workers or max(1, usable_cpus() // max(torch.get_num_threads(), 1))  # each runs torch's threads
    # fewer blocks than workers: each block's rows are split into ranges too (the same files, whatever the split)
    parts = max(1, workers // max(len(plan.todo), 1))
    ranges = row_ranges(index, plan.chunk_rows, parts) if parts > 1 else [(0, plan.rows)]
    items = [(b, lo, hi) for b in plan.todo for lo, hi in ranges]
    scans: dict[int, list[BlockScan]] = defaultdict(list)
    with (
        scanning(),
        plan.progress_bar(progress) as bar,
        ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix="gradstore-score") as pool,
    ):
        running = {pool.submit(plan.scan, *item): item[0] for item in items}
        for done in as_completed(running):
            b = running[done]
            scans[b].append(done.result())
            if len(scans[b]) == len(ranges):
                bar.update(plan.finish(b, scans.pop(b)))
    return plan.summary(time.perf_counter() - started)


def read_batch(output: str | Path) -> list[dict[str, Any]]:
    """Every record :func:`score_batch` wrote into ``output``, in query order."""
    out = Path(output)
    fmt = json.loads((out / META).read_text())["format"]
    records: list[dict[str, Any]] = []
    for path in sorted(out.glob(f"part-*.{fmt}")):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            records.extend(pq.read_table(path).to_pylist())
        else:
            records.extend(json.loads(line) for line in path.read_text().splitlines())
    return records
