"""Batch scoring on Ray Data (issue 19 part 5, ``gradstore score --ray``): the row scan of
:func:`~gradstore.store.batch_scoring.score_batch` run in Ray workers, the exact merge in the driver.

The driver plans the batch exactly as the local path does (:class:`~gradstore.store.batch_scoring.BatchPlan`: the
blocks of queries, their files, ``_batch.json``, the blocks already written) and puts the prepared queries in Ray's
object store once. Every (block, row range) pair is one item of a Ray Data dataset; a task on a Ray worker, whose
process opens its own copy of the index once (``opener``; on a cluster every node must reach the index and store
paths: a shared file system or ``s3://``) and keeps it while it is the driver's index, streams the range's rows past
the block (:func:`~gradstore.store.batch_scoring.scan_rows`) and returns its candidates and ``|score|`` sums. The
driver merges each block's scans in row order and re-scores the survivors exactly (:meth:`BatchPlan.finish`), so the
files hold what :func:`score_batch` writes, bit for bit. Row ranges are the index's shards (snapped to the chunk
grid, so each chunk is the local path's chunk), or ``parts`` equal ranges.

Needs the ``ray`` extra (``pip install 'gradstore[ray]'``). Ray is started on this machine (``ray.init()``) unless
it is running already or ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .batch_scoring import BatchPlan, BatchScoringSummary, BlockScan, OutputFormat, row_ranges, scan_rows
from .errors import IndexOptionsError
from .gradient_store import GradientStore
from .index import GradientIndex
from .scoring import PreparedQueries

__all__ = ["row_ranges", "score_batch_ray"]


def _open_index(index_path: Any, store_path: Any) -> GradientIndex:
    return GradientIndex.open(index_path, GradientStore.open(store_path), device="cpu")


_OPENED: dict[tuple[bytes, str], GradientIndex] = {}  # per Ray worker process: indexes it opened, reused by tasks


def _identity(index: GradientIndex) -> str:
    return json.dumps(index.manifest.files, sort_keys=True, default=str)


def _worker_index(opener: Callable[[], GradientIndex], identity: str) -> GradientIndex:
    """The index ``opener`` opens, opened once per worker process and kept while it is the driver's index."""
    key = (pickle.dumps(opener), identity)
    if key not in _OPENED:
        index = opener()
        if _identity(index) != identity:
            raise IndexOptionsError(
                f"the index a Ray worker opened at {index.path} is not the one the driver scores (rebuilt meanwhile?)"
            )
        _OPENED.clear()  # one index per worker at a time
        _OPENED[key] = index
    return _OPENED[key]


def _scan_item(
    item: dict[str, Any],
    *,
    opener: Callable[[], GradientIndex],
    identity: str,
    vectors: list,
    blocks: list[tuple[int, int]],
    chunk_rows: int,
    keep: int,
) -> dict[str, Any]:
    """A Ray Data map function: one (block, row range) item scanned by this worker's copy of the index."""
    import ray

    b, first, stop = int(item["block"]), int(item["first"]), int(item["stop"])
    lo, hi = blocks[b]
    q64 = np.ascontiguousarray(ray.get(vectors[0])[lo:hi].T)  # wrapped in a list: Ray passes the ref, not its value
    scan = scan_rows(_worker_index(opener, identity), q64, first, stop, chunk_rows, keep)
    return {"block": b, "scan": pickle.dumps(scan, protocol=5)}


def _pool(ray: Any, workers: int) -> dict[str, Any]:
    """At most ``workers`` tasks at once: ``compute=TaskPoolStrategy`` (Ray >= 2.51), else ``concurrency``."""
    strategy = getattr(ray.data, "TaskPoolStrategy", None)
    return {"compute": strategy(size=workers)} if strategy is not None else {"concurrency": workers}


def score_batch_ray(
    index: GradientIndex,
    queries: PreparedQueries,
    output: str | Path,
    k: int = 10,
    *,
    opener: Callable[[], GradientIndex] | None = None,
    query_ids: Sequence[Any] | np.ndarray | None = None,
    block_queries: int = 256,
    chunk_rows: int | None = None,
    margin: int | None = None,
    parts: int | None = None,
    workers: int | None = None,
    output_format: OutputFormat = "auto",
    progress: bool = True,
) -> BatchScoringSummary:
    """:func:`~gradstore.store.batch_scoring.score_batch` with the row scan in Ray Data actors: same arguments,
    same files (bit for bit), same resume.

    ``opener``: a picklable callable that opens the index in a worker (default: ``GradientIndex.open`` of
    ``index.path`` over ``index.store.path``; pass one for an index opened with other options or an eval store, as
    ``gradstore score --ray`` passes the run's). ``parts``: row ranges per block (default: the index's shards, one
    range when unsharded). ``workers``: scans at once (default: the cluster's CPUs, at most the items)."""
    try:
        import ray
    except ImportError:
        raise IndexOptionsError("batch scoring on Ray needs Ray: pip install 'gradstore[ray]'") from None
    plan = BatchPlan.make(index, queries, output, k, query_ids, block_queries, chunk_rows, margin, output_format)
    started = time.perf_counter()
    if not plan.todo:
        return plan.summary(time.perf_counter() - started)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    ranges = row_ranges(index, plan.chunk_rows, parts)
    items = [{"block": b, "first": lo, "stop": hi} for b in plan.todo for lo, hi in ranges]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(workers or cpus, len(items)))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the plan's bar counts queries instead
    scan = partial(
        _scan_item,
        opener=opener or partial(_open_index, index.path, index.store.path),
        identity=_identity(index),
        vectors=[ray.put(plan.vectors)],
        blocks=plan.blocks,
        chunk_rows=plan.chunk_rows,
        keep=plan.keep,
    )
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
        scan,
        num_cpus=1,
        **_pool(ray, workers),
    )
    scans: dict[int, list[BlockScan]] = defaultdict(list)
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)  # no lines per dataset execution: the bar says how far it is
    try:
        with plan.progress_bar(progress) as bar:
            for row in dataset.iter_rows():
                b = int(row["block"])
                scans[b].append(pickle.loads(row["scan"]))
                if len(scans[b]) == len(ranges):
                    bar.update(plan.finish(b, scans.pop(b)))
    finally:
        data_log.setLevel(level)
    if scans:
        raise IndexOptionsError(
            f"Ray returned incomplete scans of blocks {sorted(scans)}; nothing was written for them"
        )
    return plan.summary(time.perf_counter() - started)
