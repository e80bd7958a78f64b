"""Batch scoring (issue 19 part 5, local path) against the read bound, side by side in one run.

One float16 ``flat`` index (N rows, D, 2 checkpoints, streamed: ``resident_mb = 0``); M queries scored by
:func:`gradstore.store.score_batch` in blocks. Printed: the read bound (every part file's bytes read once with
``os.preadv``, and the same rows read and widened to float32 by ``exact_vectors``, as the scorer reads them), then the
scorer's rows/s and (query, row) pairs/s, and the bytes per second it streams (each block streams every row once).

    python benchmarks/batch_scoring.py [--rows 20000] [--dim 1024] [--queries 256] [--block 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.store import GradientIndex, IndexOptions, score_batch
from gradstore.store.search import FlatBackend
from tests.helpers.search import synthetic_spec, write_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024, help="a square number (one synthetic layer)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--block", type=int, default=128, help="queries per block")
    parser.add_argument("--workers", type=int, default=2)
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
    prepared = index.prepare(rng.standard_normal((args.queries, 2, spec.dim)).astype(np.float32), [0.1, 0.05])
    stored = sum(part.rows * part.row_bytes for files in backend.files for part in files)
    buffer = bytearray(1 << 20)
    start = time.perf_counter()
    for files in backend.files:
        for part in files:
            step = max(1, len(buffer) // part.row_bytes)
            for lo in range(0, part.rows, step):
                part.read(lo, min(lo + step, part.rows), buffer)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    chunk = max(1, (32 << 20) // (4 * 2 * spec.dim))
    for lo in range(0, index.num_rows, chunk):
        index.exact_vectors(np.arange(lo, min(lo + chunk, index.num_rows)))
    widen_s = time.perf_counter() - start
    out = workdir / "scores"
    summary = score_batch(index, prepared, out, args.k, block_queries=args.block, workers=args.workers, progress=False)
    passes = summary.blocks_written
    print(
        f"N = {args.rows}, D = {spec.dim}, 2 checkpoints, float16 ({stored / 1e6:.0f} MB), M = {args.queries} queries "
        f"in blocks of {args.block}, {args.workers} workers, k = {args.k}"
    )
    print(f"read bound (preadv, 1 MiB buffer): {read_s * 1e3:8.1f} ms  {stored / read_s / 1e9:6.2f} GB/s")
    print(f"read + widen (exact_vectors):      {widen_s * 1e3:8.1f} ms  {stored / widen_s / 1e9:6.2f} GB/s")
    print(
        f"batch scoring: {summary.seconds:.2f} s, {summary.rows_per_second:,.0f} rows/s, "
        f"{summary.pairs_per_second:,.0f} pairs/s, {stored * passes / summary.seconds / 1e9:.2f} GB/s of stored rows "
        f"({passes} passes), {stored * passes / summary.seconds / (stored / read_s):.0%} of the read bound"
    )
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
