"""Flat search latency, resident (float32 in RAM, ``[index] resident_mb``) vs streamed from disk by blocks
(``resident_mb = 0``), over one float16 index: N = 100k, D = 1024, 2 checkpoints, one query, k = 10.

    python benchmarks/flat_residency.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.store import GradientIndex, IndexOptions
from tests.helpers.search import synthetic_spec, write_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    spec = synthetic_spec([("w", 32, 32)])  # D = 1024
    workdir = Path(tempfile.mkdtemp())
    rows = rng.standard_normal((args.rows, spec.dim)).astype(np.float16)
    store = write_store(workdir / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows)}, dtype="float16")
    del rows
    GradientIndex.build(store, IndexOptions(kind="flat"), workdir / "s.index", progress=False)
    query = rng.standard_normal((1, 2, spec.dim)).astype(np.float32)
    for resident_mb in (0, 1024):
        index = GradientIndex.open(workdir / "s.index", store, options=IndexOptions(resident_mb=resident_mb))
        index.search(query, [0.1, 0.05], 10)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            index.search(query, [0.1, 0.05], 10)
            times.append(time.perf_counter() - start)
        where = "resident (float32 in RAM)" if index.backend.resident is not None else "streamed from disk"
        print(
            f"resident_mb={resident_mb:<5} {where:<26} p50 {np.median(times) * 1e3:7.1f} ms   "
            f"p99 {np.percentile(times, 99) * 1e3:7.1f} ms"
        )


if __name__ == "__main__":
    main()
