"""Streamed float16 flat scan against its read bound, before vs after, side by side in one run (issue 19 part 2).

One float16 ``flat`` index (N rows, D, 2 checkpoints) searched with ``resident_mb = 0`` (every search streams the
part files). In one process, in rotating order, per repeat:

* ``read bound``: ``os.preadv`` of every part file's bytes into one reused 1 MiB buffer (page cache warm; a
  buffer that stays in cache, the fastest size measured) by one thread: the bytes a streamed scan must read, at
  one core's best copy bandwidth; ``read xN``: the same by the N threads the scan uses (each every N-th MiB into
  a buffer of its own): the bound a scan on N threads is fairly compared with; ``read 32M``: one thread into a
  32 MiB buffer (the bound this benchmark used first: a buffer past the caches, about 2-4x slower);
* ``before``: the scan before issue 19 part 2 (read a block, then widen and score it, one after the other);
* ``scan x1``: :meth:`FlatBackend.candidates` on one thread (1 MiB pieces read into a buffer that stays in cache
  and scored from there at once, the float16 rows widened in cache-sized pieces straight into the BLAS; the scan
  as it was before the scan threads); ``scan xN``: the same on N threads (``FlatBackend.SCAN_THREADS``: each
  block's pieces cut into N runs, each thread reading and scoring its own);
* ``search``: a whole ``GradientIndex.search`` with the default scan threads (``scan_threads(0)``);
* ``re-score``: a whole ``GradientIndex.search`` minus the candidate scan: the exact float64 re-score of the
  candidates' rows, read with byte-range reads (``os.preadv`` per run of rows).

    python benchmarks/flat_scan.py [--rows 100000] [--dim 1024] [--repeats 7] [--threads N] [--workdir DIR]

``--workdir`` keeps the store and index there and reuses them on the next run (same rows and dim).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.store import GradientIndex, GradientStore, IndexOptions
from gradstore.store.scoring import Scoring
from gradstore.store.search import FlatBackend, scan_threads
from tests.helpers.search import synthetic_spec, write_store


class _TopK:
    """The ``k`` largest (or smallest) scores of each query over blocks of rows (the scan before issue 19 part 2)."""

    def __init__(self, largest: bool):
        self.largest = largest
        self.values: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, start: int, k: int) -> None:
        """Keep the block's best ``k`` of ``[n, B]`` scores of rows ``start .. start + n``."""
        best = scores.topk(min(k, len(scores)), dim=0, largest=self.largest)
        self.values.append(best.values)
        self.rows.append(best.indices + start)

    def rows_of_best(self, k: int) -> np.ndarray:
        """``[B, k]`` rows of each query's overall best ``k``."""
        values, rows = torch.cat(self.values), torch.cat(self.rows)
        best = values.topk(k, dim=0, largest=self.largest).indices
        return torch.gather(rows, 0, best).T.cpu().numpy()


def read_bound(backend: FlatBackend, buffer: bytearray, share: tuple[int, int] = (0, 1)) -> None:
    """Read every part file into ``buffer``, a buffer's worth at a time; ``share = (i, n)``: only the i-th of
    every n buffers' worth (n threads read the files together)."""
    for files in backend.files:
        for part in files:
            block_rows = max(1, len(buffer) // part.row_bytes)
            for lo in range(share[0] * block_rows, part.rows, share[1] * block_rows):
                part.read(lo, min(lo + block_rows, part.rows), buffer)


def threaded_read_bound(backend: FlatBackend, buffers: list[bytearray], pool: ThreadPoolExecutor) -> None:
    """:func:`read_bound` by ``len(buffers)`` threads, each reading every n-th 1 MiB into a buffer of its own."""
    n = len(buffers)
    list(pool.map(lambda i: read_bound(backend, buffers[i], (i, n)), range(n)))


def scan(backend: FlatBackend, prepared, k: int, threads: int) -> None:
    FlatBackend.SCAN_THREADS = threads
    backend.candidates(prepared, k)


def before(backend: FlatBackend, queries: np.ndarray, k: int) -> None:
    """The scan as it was before issue 19 part 2: read, then widen in 512-row pieces with torch matmul, in turn."""
    b, d = len(queries), backend.dim
    per = queries.reshape(b, -1, d)
    q = [torch.from_numpy(np.ascontiguousarray(per[:, c].T)) for c in range(per.shape[1])]
    top, bottom = _TopK(True), _TopK(False)
    buffer = bytearray()
    for r, start, lo, hi in backend.blocks():
        scores = torch.zeros((hi - lo, b))
        for c, part in enumerate(backend.files[r]):
            if len(buffer) < (hi - lo) * part.row_bytes:
                buffer = bytearray((hi - lo) * part.row_bytes)
            rows = torch.from_numpy(part.read(lo, hi, buffer))
            wide = torch.empty((512, d))
            for p in range(0, hi - lo, 512):
                piece = rows[p : p + 512]
                wide[: len(piece)].copy_(piece)
                scores[p : p + len(piece)] += wide[: len(piece)] @ q[c]
        top.add(scores, start + lo, k)
        bottom.add(scores, start + lo, k)
        scores.abs().sum(0, dtype=torch.float64)
    top.rows_of_best(k), bottom.rows_of_best(k)


def search(index: GradientIndex, raw: np.ndarray, weights: np.ndarray, k: int, threads: int) -> None:
    FlatBackend.SCAN_THREADS = threads
    index.search(raw, weights, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024, help="a square number (one synthetic layer)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="build here once and reuse (default: a new temporary dir)")
    parser.add_argument("--threads", type=int, default=0, help="scan threads of 'xN' (0: the default, at least 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one scoring thread, as a served query on a 2-core box
    side = round(args.dim**0.5)
    rng = np.random.default_rng(0)
    spec = synthetic_spec([("w", side, side)])
    workdir = args.workdir or Path(tempfile.mkdtemp())
    if (workdir / "s.index").exists():
        store = GradientStore.open(workdir / "s.zarr")
        assert store.num_rows("c0") == args.rows, f"{workdir} holds another store"
    else:
        rows = rng.standard_normal((args.rows, spec.dim)).astype(np.float16)
        store = write_store(workdir / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows[::-1])}, dtype="float16")
        del rows
        GradientIndex.build(store, IndexOptions(kind="flat"), workdir / "s.index", progress=False)
    index = GradientIndex.open(workdir / "s.index", store, options=IndexOptions(resident_mb=0), device="cpu")
    backend = index.backend
    assert isinstance(backend, FlatBackend) and backend.resident is None
    raw = rng.standard_normal((1, 2, spec.dim)).astype(np.float32)
    weights = np.array([0.1, 0.05])
    prepared = index.prepare(raw, weights)
    nbytes = sum(part.rows * part.row_bytes for files in backend.files for part in files)
    buffer, big_buffer = bytearray(1 << 20), bytearray(32 << 20)
    threads = args.threads or max(2, scan_threads(0))
    buffers, pool = [bytearray(1 << 20) for _ in range(threads)], ThreadPoolExecutor(threads)
    runs = {
        "read bound": lambda: read_bound(backend, buffer),
        f"read x{threads}": lambda: threaded_read_bound(backend, buffers, pool),
        "read 32M": lambda: read_bound(backend, big_buffer),
        "before": lambda: before(backend, prepared.concatenated(), args.k),
        "scan x1": lambda: scan(backend, prepared, args.k, 1),
        f"scan x{threads}": lambda: scan(backend, prepared, args.k, threads),
        "search": lambda: search(index, raw, weights, args.k, 0),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for name in names:
        runs[name]()  # warm-up: page cache, lazy structures
    for i in range(args.repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotating order
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    FlatBackend.SCAN_THREADS = 0  # search (above and below) scans with the default threads
    # the answer does not change: the new scan's candidates equal the exact scan of all rows
    found = index.search(raw, weights, args.k)
    exact = Scoring.row_contributions(prepared, index.exact_vectors(np.arange(index.num_rows)), 0).sum(-1)
    order = np.lexsort((index.ids, -exact))[: args.k]
    assert found.proponent_rows[0].tolist() == order.tolist(), "proponents differ from the exact scan"
    assert np.array_equal(found.proponent_scores[0], exact[order]), "scores differ from the exact re-score"
    # re-score alone: the exact float64 contributions of 2k candidates' rows, read by byte ranges
    candidates = np.unique(np.r_[found.proponent_rows[0], found.opponent_rows[0]])
    rescore = []
    for _ in range(args.repeats * 3):
        start = time.perf_counter()
        index.score_rows(prepared, candidates)
        rescore.append((time.perf_counter() - start) * 1e3)

    med = {name: float(np.median(t)) for name, t in times.items()}
    bound, threaded = med["read bound"], med[f"read x{threads}"]
    print(
        f"N = {args.rows}, D = {spec.dim}, 2 checkpoints, float16, one query, k = {args.k}; "
        f"{nbytes / 1e6:.0f} MB streamed per search; {os.cpu_count()} CPUs; median of {args.repeats}"
    )
    print(f"{'':<12} {'ms p50':>8} {'min':>8} {'x read bound':>13} {f'x read x{threads}':>10} {'GB/s':>7}")
    for name in names:
        t, m = times[name], med[name]
        print(f"{name:<12} {m:8.1f} {min(t):8.1f} {m / bound:13.2f} {m / threaded:10.2f} {nbytes / m / 1e6:7.2f}")
    found_rows = backend.candidates(prepared, args.k)
    print(
        f"candidates (exact top/bottom k plus rows within the float32 error margin of the k-th): "
        f"{(found_rows.proponent_rows >= 0).sum()} proponents, {(found_rows.opponent_rows >= 0).sum()} opponents"
    )
    print(
        f"re-score of {len(candidates)} rows x 2 checkpoints (byte-range reads, float64): "
        f"{np.median(rescore):.2f} ms p50, {max(rescore):.2f} ms max"
    )


if __name__ == "__main__":
    main()
