"""Scale-out, local vs Ray (issue 19 parts 5 and 8), side by side in one run, rotating order: online search latency
and memory per shard replica, and batch-scoring rows/s, for the same float16 ``flat`` index built with 1, 2 and 4
shards.

One synthetic store (N rows, D, 2 checkpoints, float16) indexed three times (``[index] shards`` 1, 2, 4). Modes:

* ``local, s shards``: the index searched in this process (``GradientIndex.search``: one thread per shard, the exact
  float64 re-score), as ``gradstore serve`` does; batch scoring by :func:`gradstore.store.score_batch` (a thread
  pool of ``--cpus``);
* ``ray, s shards``: the same index opened with the loader of ``gradstore serve --ray``
  (:class:`gradstore.server.run.ray_backend.RayShards`): every shard searched by its own Ray Serve deployment
  (``ray_backend.shard_app``, ``--shard-cpus`` each; ``ray.init(num_cpus=--cpus)`` on this machine), merged and
  re-scored in this process; batch scoring by :func:`gradstore.store.ray_scoring.score_batch_ray` with one row
  range per shard.

Search latency is that of single queries at the index (handle) level, ``--search-queries`` per round, k = ``--k``,
random checkpoint weights (one negative); the answers of every mode are checked equal to the local unsharded ones
and every batch output to the first one (``mean_abs_score`` to a relative 1e-6). Memory per shard replica: RSS and
USS (memory unique to the process: the shard's rows and its own heap, not the shared libraries) of each replica
process, whose pid it reports. The first search queries and the first Ray batch (which starts the workers) are
warm-ups, not counted. Printed: a line per mode and round, then a markdown table (search p50 / p99 over all rounds,
batch rows/s: the median round).

    python benchmarks/scale_out.py [--quick] [--rows 20000] [--dim 1024] [--queries 256] [--block 64]
        [--search-queries 50] [--cpus 2] [--shard-cpus 0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.search

from gradstore.server.run.config import RunConfig
from gradstore.server.run.ray_backend import RayShards, shard_app
from gradstore.store import GradientIndex, IndexOptions, score_batch
from gradstore.store.batch_scoring import read_batch
from gradstore.store.ray_scoring import score_batch_ray
from tests.helpers.search import synthetic_spec, write_store

SHARDS = (1, 2, 4)
RESULT_FIELDS = ("proponent_rows", "proponent_scores", "opponent_rows", "opponent_scores")

# the config a shard replica loads its shard with: only [index] (its path and options) is read; [task] and
# [[checkpoints]] are there because a run config needs them
RUN_TOML = """
[task]
object = "gradstore.demos.digits:DigitsTask"
[store]
path = "s.zarr"
[[checkpoints]]
name = "c0"
path = "c0.pt"
lr = 0.1
[[checkpoints]]
name = "c1"
path = "c1.pt"
lr = 0.05
[index]
kind = "flat"
shards = {shards}
path = "s{shards}.index"
"""


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4000 rows, D=256, 64 queries, 30 searches (~2 min)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024, help="a square number (one synthetic layer)")
    parser.add_argument("--queries", type=int, default=256, help="batch-scoring queries")
    parser.add_argument("--block", type=int, default=64, help="batch-scoring queries per block")
    parser.add_argument("--search-queries", type=int, default=50, help="single-query searches per mode and round")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs and local threads")
    parser.add_argument("--shard-cpus", type=float, default=0.0, help="Ray CPUs a shard replica reserves")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.queries, args.block, args.search_queries = 4000, 256, 64, 32, 30
    return args


def _deploy(workdir: Path, shard_cpus: float) -> dict[int, list[Any]]:
    """Serve applications ``scale-out-<s>x<i>`` (shard i of the s-shard index), all started at once."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    names = [(s, i) for s in SHARDS for i in range(s)]
    apps = [shard_app({"config": str(workdir / f"s{s}.toml"), "shard": i, "num_cpus": shard_cpus}) for s, i in names]
    run_many = getattr(serve, "run_many", None)
    if run_many is not None:  # Ray >= 2.44: the replicas start in parallel
        targets = [
            serve.RunTarget(app, name=f"scale-out-{s}x{i}", route_prefix=None) for app, (s, i) in zip(apps, names)
        ]
        handles = run_many(targets)
    else:
        handles = [serve.run(app, name=f"scale-out-{s}x{i}", route_prefix=None) for app, (s, i) in zip(apps, names)]
    out: dict[int, list[Any]] = defaultdict(list)
    for (s, _), handle in zip(names, handles):
        out[s].append(handle)
    return out


def _memory_mb(handles: list[Any]) -> tuple[float, float]:
    """Mean RSS and USS (MB) of the replica processes of ``handles`` (on this machine)."""
    import psutil

    rss, uss = [], []
    for handle in handles:
        info = psutil.Process(handle.describe.remote().result(timeout_s=30)["pid"]).memory_full_info()
        rss.append(info.rss / 1e6)
        uss.append(info.uss / 1e6)
    return float(np.mean(rss)), float(np.mean(uss))


def _searches(index: GradientIndex, queries: np.ndarray, weights: np.ndarray, k: int) -> tuple[list[float], Any]:
    """Milliseconds of each single-query search, and the answers (one search of all queries)."""
    took = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], weights, k)
        took.append((time.perf_counter() - started) * 1e3)
    return took, index.search(queries, weights, k)


def _check_batch(name: str, records: list[dict], expected: list[dict]) -> None:
    """Batch outputs equal but for ``mean_abs_score``: a float32 sum over every row, whose last bits depend on how
    the rows were split in ranges (the shards), equal to a relative 1e-6."""
    mean = "mean_abs_score"
    assert [{**r, mean: None} for r in records] == [{**r, mean: None} for r in expected], f"{name}: output differs"
    np.testing.assert_allclose([r[mean] for r in records], [r[mean] for r in expected], rtol=1e-6, err_msg=name)


def main() -> None:
    args = _arguments()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    side = round(args.dim**0.5)
    rng = np.random.default_rng(0)
    spec = synthetic_spec([("w", side, side)])
    workdir = Path(tempfile.mkdtemp(prefix="gradstore-scale-out-"))
    try:
        rows = rng.standard_normal((args.rows, spec.dim)).astype(np.float16)
        store = write_store(workdir / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows[::-1])}, dtype="float16")
        del rows
        local: dict[int, GradientIndex] = {}
        for s in SHARDS:
            (workdir / f"s{s}.toml").write_text(RUN_TOML.format(shards=s))
            options = IndexOptions(kind="flat", shards=s)
            local[s] = GradientIndex.build(store, options, workdir / f"s{s}.index", progress=False)
        weights = np.array([0.1, -0.05])
        raw = rng.standard_normal((args.queries, 2, spec.dim)).astype(np.float32)
        searched = rng.standard_normal((args.search_queries, 2, spec.dim)).astype(np.float32)
        prepared = local[1].prepare(raw, weights)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        handles = _deploy(workdir, args.shard_cpus)
        deployed_s = time.perf_counter() - started
        on_ray = {
            s: GradientIndex.open(
                workdir / f"s{s}.index",
                store,
                options=RunConfig.load(workdir / f"s{s}.toml").index,
                loader=RayShards(handles[s]),
            )
            for s in SHARDS
        }
        common = {"block_queries": args.block, "output_format": "jsonl", "progress": False}
        score_batch_ray(local[1], prepared, workdir / "warm-up", args.k, **common)
        indexes = {f"local, {s} shard{'s' * (s > 1)}": local[s] for s in SHARDS}
        indexes |= {f"ray, {s} shard{'s' * (s > 1)}": on_ray[s] for s in SHARDS}
        batch = {
            **{f"local, {s} shard{'s' * (s > 1)}": (score_batch, local[s], {"workers": args.cpus}) for s in SHARDS},
            **{f"ray, {s} shard{'s' * (s > 1)}": (score_batch_ray, local[s], {}) for s in SHARDS},
        }
        for index in indexes.values():
            _searches(index, searched[:3], weights, args.k)  # warm-up: first loads, first calls
        print(
            f"{args.rows} rows x 2 checkpoints x D={spec.dim} (float16, flat), searches of 1 query, k={args.k}; "
            f"batch scoring {args.queries} queries in blocks of {args.block}; {args.cpus} Ray CPUs, shards reserve "
            f"{args.shard_cpus:g} CPU each; {sum(SHARDS)} replicas deployed in {deployed_s:.1f} s",
            flush=True,
        )
        print(f"{'mode':<16} {'round':>5} {'p50 ms':>8} {'p99 ms':>8} {'batch s':>8} {'rows/s':>10} {'MB/s':>8}")
        names = list(indexes)
        latencies: dict[str, list[float]] = defaultdict(list)
        rates: dict[str, list[tuple[float, float]]] = defaultdict(list)
        expected_search, expected_batch = None, None
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                took, answer = _searches(indexes[name], searched, weights, args.k)
                expected_search = expected_search or answer
                for field in RESULT_FIELDS:
                    assert np.array_equal(getattr(answer, field), getattr(expected_search, field)), (name, field)
                latencies[name] += took
                scorer, index, extra = batch[name]
                out = workdir / f"{name.replace(' ', '').replace(',', '')}-{r}"
                summary = scorer(index, index.prepare(raw, weights), out, args.k, **common, **extra)
                records = read_batch(out)
                expected_batch = expected_batch or records
                _check_batch(name, records, expected_batch)
                mb = summary.bytes_scanned / summary.seconds / 1e6
                rates[name].append((summary.rows_per_second, mb))
                p50, p99 = np.percentile(took, [50, 99])
                line = f"{p50:>8.1f} {p99:>8.1f} {summary.seconds:>8.2f} {summary.rows_per_second:>10,.0f} {mb:>8,.0f}"
                print(f"{name:<16} {r:>5} {line}", flush=True)
                shutil.rmtree(out)
        memory = {s: _memory_mb(handles[s]) for s in SHARDS}
        print()
        print("| mode | search p50 / p99 ms | memory per shard replica, RSS / USS MB | batch rows/s (MB/s) |")
        print("| --- | --- | --- | --- |")
        for name in names:
            p50, p99 = np.percentile(latencies[name], [50, 99])
            s = int(name.split(", ")[1].split()[0])
            mem = f"{memory[s][0]:,.0f} / {memory[s][1]:,.0f}" if name.startswith("ray") else "(in this process)"
            rows_s, mb = statistics.median_high(rates[name])
            print(f"| {name} | {p50:.1f} / {p99:.1f} | {mem} | {rows_s:,.0f} ({mb:,.0f}) |")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
