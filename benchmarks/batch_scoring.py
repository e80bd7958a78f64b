"""Batch scoring (issue 19 part 5, local path) against the read bound, side by side in one run.

One float16 ``flat`` index (N rows, D, 2 checkpoints, streamed: ``resident_mb = 0``); for each ``--queries`` count M,
M queries scored by :func:`gradstore.store.score_batch` (blocks of ``--block`` queries; a block with fewer queries
than workers has its rows split among them), best of ``--repeat`` runs, every run in one process. Printed: the read
bound (every part file's bytes read once with ``os.preadv`` into a 1 MiB buffer, best of ``--repeat``), and per M
the scorer's rows/s, (query, row) pairs/s and the stored bytes per second it streams (each block streams every row
once) beside its two bounds: the read bound, and the arithmetic bound (a float32 BLAS product of the same shape and
flops on rows already in memory, on ``--workers`` threads). Few queries are bound by the read, many by the
arithmetic.

    python benchmarks/batch_scoring.py [--rows 50000] [--dim 1024] [--queries 1 2 8 64 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.store import GradientIndex, IndexOptions, score_batch
from gradstore.store.blas import scanning
from gradstore.store.search import FlatBackend
from tests.helpers.search import synthetic_spec, write_store


def arithmetic_seconds(rows: int, width: int, block: int, passes: int, workers: int) -> float:
    """Seconds ``workers`` threads take for ``passes`` float32 products of ``rows x width`` rows (in memory, 4096 at a
    time) with ``width x block`` queries: the flops the scorer does, at the BLAS's rate."""
    chunk = np.random.default_rng(1).standard_normal((4096, width)).astype(np.float32)
    queries = np.ones((width, block), dtype=np.float32)
    steps = max(1, rows * passes // 4096)
    with scanning(), ThreadPoolExecutor(workers) as pool:  # numpy's BLAS on one thread per worker, as the scorer
        start = time.perf_counter()
        list(pool.map(lambda _: chunk @ queries, range(steps)))
        return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)  # one torch thread per worker, as a served process runs (Run.serving_threads)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1024, help="a square number (one synthetic layer)")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 2, 8, 64, 256], help="queries per run")
    parser.add_argument("--block", type=int, default=256, help="queries per block (score_batch's block_queries)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    side = round(args.dim**0.5)
    rng = np.random.default_rng(0)
    spec = synthetic_spec([("w", side, side)])
    workdir = Path(tempfile.mkdtemp())
    rows = rng.standard_normal((args.rows, spec.dim)).astype(np.float16)
    store = write_store(workdir / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows[::-1])}, dtype="float16")
    del rows
    GradientIndex.build(store, IndexOptions(kind="flat"), workdir / "s.index", progress=False)
    index = GradientIndex.open(workdir / "s.index", store, options=IndexOptions(resident_mb=0), device="cpu")
    backend = index.backend
    assert isinstance(backend, FlatBackend) and backend.resident is None
    all_queries = rng.standard_normal((max(args.queries), 2, spec.dim)).astype(np.float32)
    stored = sum(part.rows * part.row_bytes for files in backend.files for part in files)
    buffer = bytearray(1 << 20)
    read_s = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for files in backend.files:
            for part in files:
                step = max(1, len(buffer) // part.row_bytes)
                for lo in range(0, part.rows, step):
                    part.read(lo, min(lo + step, part.rows), buffer)
        read_s = min(read_s, time.perf_counter() - start)
    print(
        f"N = {args.rows}, D = {spec.dim}, 2 checkpoints, float16 ({stored / 1e6:.0f} MB), {args.block} queries per "
        f"block, {args.workers} workers, k = {args.k}, best of {args.repeat}; read bound (preadv, 1 MiB buffer): "
        f"{read_s * 1e3:.1f} ms, {stored / read_s / 1e9:.2f} GB/s"
    )
    print(f"{'queries':>7} {'s':>7} {'rows/s':>10} {'pairs/s':>12} {'GB/s':>6} {'% read':>7} {'% arith':>8}")
    for m in args.queries:
        prepared = index.prepare(all_queries[:m], [0.1, 0.05])
        best = None
        for attempt in range(args.repeat):
            summary = score_batch(
                index,
                prepared,
                workdir / f"scores-{m}-{attempt}",
                args.k,
                block_queries=args.block,
                workers=args.workers,
                progress=False,
            )
            if best is None or summary.seconds < best.seconds:
                best = summary
        assert best is not None
        passes = best.blocks_written
        arith_s = arithmetic_seconds(index.num_rows, 2 * spec.dim, min(m, args.block), passes, args.workers)
        streamed = stored * passes / best.seconds
        print(
            f"{m:>7} {best.seconds:7.3f} {best.rows_per_second:10,.0f} {best.pairs_per_second:12,.0f} "
            f"{streamed / 1e9:6.2f} {streamed / (stored / read_s):7.0%} {arith_s / best.seconds:8.0%}"
        )
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
