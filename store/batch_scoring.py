"""Batch scoring (issue 19 part 5, local path): many queries against every row of an index, exactly, without an
``N x M`` score matrix.

Queries are taken in blocks of ``block_queries``; for each block the index's rows stream by in chunks of
``chunk_rows`` (their exact vectors: :meth:`GradientIndex.exact_vectors`, byte-range reads of a flat index's part
files, a FAISS kind's stored vectors, or the store's rows), each chunk is scored in float64 against the whole block
(one BLAS product) and only every query's running best ``k + margin`` proponents and opponents are kept, with the
mean and max ``|score|`` over every row. A finished block's survivors are re-scored with
:meth:`Scoring.row_contributions` (the numbers a search reports, each row's from that row alone) and ranked with ties
broken by id, so a query's answer is what ``GradientIndex.search`` on a flat index gives it, bit for bit.

The work is split so that another engine can run it (:mod:`gradstore.store.ray_scoring`: Ray Data): a
:class:`BatchPlan` lists the blocks, :meth:`BatchPlan.scan` streams one block past one range of rows (anywhere the
index can be opened) and :meth:`BatchPlan.finish` merges a block's scans, in row order, and re-scores and writes it;
the local path is one scan of every row per block. Blocks run on a thread pool (the BLAS releases the GIL) and each
is written as one file in ``output`` (Parquet when pyarrow is installed, else JSON lines), atomically: a rerun with
the same queries skips the blocks already written (``_batch.json`` records what the files answer, so other queries
or another index are refused, not mixed in).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from .errors import IndexOptionsError
from .index import GradientIndex
from .scoring import PreparedQueries, Scoring

__all__ = ["BatchPlan", "BatchScoringSummary", "BlockScan", "read_batch", "scan_rows", "score_batch"]

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
    bytes_scanned: int  # float32 bytes of exact vectors scored in this run
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


class _Best:
    """Each query's running ``m`` largest (or smallest) float64 scores and their rows."""

    def __init__(self, b: int, m: int, largest: bool):
        self.m, self.largest = m, largest
        self.rows = np.zeros((0, b), dtype=np.int64)
        self.scores = np.zeros((0, b))

    def add(self, scores: np.ndarray, first: int) -> None:
        """Merge ``[n, B]`` scores of rows ``first .. first + n``."""
        self.merge(
            scores, np.broadcast_to(np.arange(first, first + len(scores), dtype=np.int64)[:, None], scores.shape)
        )

    def merge(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Merge ``[n, B]`` scores of the rows ``rows`` (``[n, B]``)."""
        all_scores = np.concatenate([self.scores, scores])
        all_rows = np.concatenate([self.rows, rows])
        if len(all_scores) > self.m:
            key = -all_scores if self.largest else all_scores
            keep = np.argpartition(key, self.m - 1, axis=0)[: self.m]
            all_scores = np.take_along_axis(all_scores, keep, 0)
            all_rows = np.take_along_axis(all_rows, keep, 0)
        self.scores, self.rows = all_scores, all_rows


@dataclass
class BlockScan:
    """A block of queries streamed past rows ``first .. stop``: each query's best ``keep`` candidates each way by
    float64 ranking score, the ``|score|`` sum of every chunk in row order, and the largest ``|score|``."""

    first: int
    top_rows: np.ndarray  # [<=keep, Bq] rows
    top_scores: np.ndarray
    bottom_rows: np.ndarray
    bottom_scores: np.ndarray
    abs_sums: np.ndarray  # [chunks, Bq]
    abs_max: np.ndarray  # [Bq]


def scan_rows(index: GradientIndex, q64: np.ndarray, first: int, stop: int, chunk_rows: int, keep: int) -> BlockScan:
    """Stream rows ``first .. stop`` of ``index`` (chunks of ``chunk_rows`` from ``first``) past ``q64``
    (``[C*D, Bq]`` float64 prepared queries)."""
    bq = q64.shape[1]
    top, bottom = _Best(bq, keep, largest=True), _Best(bq, keep, largest=False)
    abs_sums, abs_max = [], np.zeros(bq)
    for lo in range(first, stop, chunk_rows):
        chunk = index.exact_vectors(np.arange(lo, min(lo + chunk_rows, stop)))
        scores = chunk.astype(np.float64) @ q64  # [rows, Bq]: ranking only, the answer is re-scored exactly
        top.add(scores, lo)
        bottom.add(scores, lo)
        magnitude = np.abs(scores)
        abs_sums.append(magnitude.sum(0))
        np.maximum(abs_max, magnitude.max(0), out=abs_max)
    sums = np.array(abs_sums) if abs_sums else np.zeros((0, bq))
    return BlockScan(first, top.rows, top.scores, bottom.rows, bottom.scores, sums, abs_max)


def _digest(index: GradientIndex, queries: PreparedQueries, k: int, block_queries: int, ids: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(queries.vectors).tobytes())
    h.update(np.ascontiguousarray(queries.weights, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(json.dumps([k, block_queries, index.num_rows, index.checkpoints, index.manifest.files]).encode())
    return h.hexdigest()


def _rank(
    index: GradientIndex, queries: PreparedQueries, q: int, best: _Best, k: int, descending: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query ``q``'s exact top ``k`` among its survivors: (index rows, scores, [k, C] contributions)."""
    rows = np.unique(best.rows[:, q])
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
    vectors: np.ndarray  # [M, C*D] float64

    @property
    def rows(self) -> int:
        return self.index.num_rows

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
        keep = min(n, k + (k if margin is None else margin))
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
        vectors = np.ascontiguousarray(queries.vectors.reshape(m, width), dtype=np.float64)
        return cls(index, queries, out, k, keep, chunk_rows, ids, fmt, blocks, files, todo, vectors)

    def scan(self, b: int, first: int, stop: int, index: GradientIndex | None = None) -> BlockScan:
        """Block ``b`` streamed past rows ``first .. stop`` (``index``: another process's copy of the index)."""
        lo, hi = self.blocks[b]
        q64 = np.ascontiguousarray(self.vectors[lo:hi].T)  # [C*D, Bq]
        return scan_rows(index or self.index, q64, first, stop, self.chunk_rows, self.keep)

    def finish(self, b: int, scans: Sequence[BlockScan]) -> int:
        """Merge block ``b``'s scans (of consecutive row ranges from 0, on the chunk grid, in any order), re-score
        each query's survivors exactly, write the block's file; returns its number of queries."""
        lo, hi = self.blocks[b]
        bq, n, index = hi - lo, self.rows, self.index
        top, bottom = _Best(bq, self.keep, largest=True), _Best(bq, self.keep, largest=False)
        abs_sum, abs_max = np.zeros(bq), np.zeros(bq)
        for part in sorted(scans, key=lambda part: part.first):
            top.merge(part.top_scores, part.top_rows)
            bottom.merge(part.bottom_scores, part.bottom_rows)
            for chunk_sum in part.abs_sums:  # chunk by chunk in row order: the local path's float64 sum
                abs_sum += chunk_sum
            np.maximum(abs_max, part.abs_max, out=abs_max)
        block = PreparedQueries(self.queries.vectors[lo:hi], self.queries.weights, self.queries.active)
        records = []
        for j in range(bq):
            pro = _rank(index, block, j, top, self.k, descending=True)
            opp = _rank(index, block, j, bottom, self.k, descending=False)
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
                    "max_abs_score": float(abs_max[j]),
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
        width = self.vectors.shape[1]
        return BatchScoringSummary(
            output=self.out,
            files=self.files,
            blocks_written=len(self.todo),
            blocks_skipped=len(self.blocks) - len(self.todo),
            queries=self.queries.num_queries,
            rows=self.rows,
            seconds=seconds,
            bytes_scanned=len(self.todo) * self.rows * width * 4,
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
    extra candidates kept per query beyond ``k`` before the exact re-score (default ``k``). ``workers``: query
    blocks scored at once on a thread pool (default: the CPU count, at most the blocks). ``output_format``:
    ``parquet`` (needs pyarrow), ``jsonl``, or ``auto`` (Parquet when pyarrow is installed). A rerun with the same
    arguments skips the blocks already written; other queries, ``k``, blocks or another index are refused."""
    plan = BatchPlan.make(index, queries, output, k, query_ids, block_queries, chunk_rows, margin, output_format)
    todo = plan.todo

    def score_block(b: int) -> int:
        return plan.finish(b, [plan.scan(b, 0, plan.rows)])

    started = time.perf_counter()
    workers = workers or min(os.cpu_count() or 1, max(len(todo), 1))
    with plan.progress_bar(progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            for b in todo:
                bar.update(score_block(b))
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="gradstore-score") as pool:
                for done in pool.map(score_block, todo):
                    bar.update(done)
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
