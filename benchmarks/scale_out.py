"""Batch scoring, local vs Ray Data (issue 19 parts 5 and 8), side by side in one run, rotating order.

One float16 ``flat`` index (N rows, D, 2 checkpoints, ``--shards`` shards); M queries scored by
:func:`gradstore.store.score_batch` (thread pool) and by :func:`gradstore.store.ray_scoring.score_batch_ray` with the
rows split in 1, 2, 4 ranges per block (``ray.init(num_cpus=--cpus)`` on this machine; the first Ray call, which
starts the workers, is a warm-up and not counted). Printed per mode and round: rows/s (each block streams every row
once), (query, row) scores/s and MB/s of float32 vectors scored; all outputs are checked equal to the local one.

    python benchmarks/scale_out.py [--rows 20000] [--dim 1024] [--queries 256] [--block 64] [--cpus 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.store import GradientIndex, IndexOptions, score_batch
from gradstore.store.batch_scoring import read_batch
from gradstore.store.ray_scoring import score_batch_ray
from tests.helpers.search import synthetic_spec, write_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024, help="a square number (one synthetic layer)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--block", type=int, default=64, help="queries per block")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs and local threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    side = round(args.dim**0.5)
    rng = np.random.default_rng(0)
    spec = synthetic_spec([("w", side, side)])
    workdir = Path(tempfile.mkdtemp())
    try:
        rows = rng.standard_normal((args.rows, spec.dim)).astype(np.float16)
        store = write_store(workdir / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows[::-1])}, dtype="float16")
        del rows
        index = GradientIndex.build(
            store, IndexOptions(kind="flat", shards=args.shards), workdir / "s.index", progress=False
        )
        raw = rng.standard_normal((args.queries, 2, spec.dim)).astype(np.float32)
        prepared = index.prepare(raw, [0.1, -0.05])
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        common = {"block_queries": args.block, "output_format": "jsonl", "progress": False}
        score_batch_ray(index, prepared, workdir / "warm-up", args.k, **common)
        modes = {
            "local": lambda out: score_batch(index, prepared, out, args.k, workers=args.cpus, **common),
            **{
                f"ray, {p} range{'s' * (p > 1)}/block": (
                    lambda out, p=p: score_batch_ray(index, prepared, out, args.k, parts=p, **common)
                )
                for p in (1, 2, 4)
            },
        }
        print(
            f"{args.rows} rows x 2 checkpoints x D={spec.dim} (float16, {args.shards} shards), {args.queries} queries"
        )
        print(f"{'mode':<24} {'round':>5} {'seconds':>8} {'rows/s':>10} {'scores/s':>12} {'MB/s':>8}")
        names = list(modes)
        expected = None
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = workdir / f"{name.replace(' ', '').replace(',', '').replace('/', '')}-{r}"
                s = modes[name](out)
                records = read_batch(out)
                expected = expected or records
                assert records == expected, f"{name}: output differs from the first mode's"
                mb = s.bytes_scanned / s.seconds / 1e6
                line = f"{s.seconds:>8.2f} {s.rows_per_second:>10,.0f} {s.pairs_per_second:>12,.0f} {mb:>8,.0f}"
                print(f"{name:<24} {r:>5} {line}", flush=True)
                shutil.rmtree(out)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
