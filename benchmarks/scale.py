"""Scale benchmark (issue 12): flat vs the on-disk approximate kind over synthetic float16 stores of N rows,
D = 1024 per checkpoint, 2 checkpoints (index width 2048).

For each N it writes a store with the store writer API (``pass_segment`` / ``write_chunk``, streamed in blocks),
then, each in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own,

* builds ``flat`` and ``--kind`` with ``on_disk=True`` (build seconds, peak RSS, bytes on disk),
* loads each index and runs ``--queries`` single queries (p50 / p99 of ``GradientIndex.search``, k = 10, the
  whole call incl. the exact re-rank; peak RSS of the search process) and, for flat, the bandwidth bound: the
  best time of reading the flat index's vector files with NumPy in the same process (page cache warm),
* recall@10 of the on-disk kind's proponents / opponents against flat's,
* appends 1% more rows (new ids, every checkpoint) and times ``GradientIndex.update`` against a full rebuild,
  when ``GradientIndex.update`` exists (otherwise "n/a"),
* the time to read ``k * rerank`` random rows from the store (the re-rank's fetch, ``CheckpointRows.read``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/scale.py [--sizes 10000,100000,1000000] [--kind ivfsq]
        [--queries 50] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/search.py

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K, LRS, CHECKPOINTS = 10, (0.01, 0.005), ("c0", "c1")


def _search_module():
    """benchmarks/search.py's synthetic data (GradientLike, synthetic_spec), loaded by path."""
    spec = importlib.util.spec_from_file_location("_bench_search", HERE / "search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``: heap, not the page cache of memory-mapped files, which
    ``ru_maxrss`` also counts), sampled every 20 ms on a thread."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- store ---------------------------------------------------------------------------------------------------------
def write_rows(segment, lo: int, hi: int, gen, seed: list[int], chunk_rows: int, first_id: int = 0) -> None:
    """Rows ``lo .. hi`` of ``segment`` (ids ``first_id + row``), generated and written a block at a time."""
    block = 16384
    for start in range(lo, hi, block):
        stop = min(hi, start + block)
        rows = gen.rows(np.random.default_rng([*seed, start]), stop - start).astype(np.float16)
        for chunk in range(start // chunk_rows, (stop - 1) // chunk_rows + 1):
            a, b = max(start, chunk * chunk_rows), min(stop, (chunk + 1) * chunk_rows)
            segment.write_chunk(chunk - lo // chunk_rows, np.arange(a, b) + first_id, rows[a - start : b - start])


def make_store(path: Path, n: int, dim: int, chunk_rows: int) -> float:
    from gradstore.store import CheckpointInfo, GradientStore

    bench = _search_module()
    gen = bench.GradientLike(dim, clusters=256, latent_rank=64, noise=0.3, norm_sigma=1.0, seed=0)
    start = time.perf_counter()
    store = GradientStore.create(path, bench.synthetic_spec(dim), dtype="float16", chunk_rows=chunk_rows)
    for c, name in enumerate(CHECKPOINTS):
        store.begin_checkpoint(CheckpointInfo(name=name, lr=LRS[c], step=c + 1))
        write_rows(store.pass_segment(name, n), 0, n, gen, [0, c, n], chunk_rows)
    np.save(path.with_name(path.name + ".queries.npy"), np.repeat(gen.queries(256), len(CHECKPOINTS), axis=1))
    return time.perf_counter() - start


def append_rows(path: Path, n: int, extra: int, dim: int, chunk_rows: int) -> None:
    """``extra`` new examples (ids ``n ..``) at every checkpoint, in a capture segment."""
    from gradstore.store import GradientStore

    bench = _search_module()
    gen = bench.GradientLike(dim, clusters=256, latent_rank=64, noise=0.3, norm_sigma=1.0, seed=0)
    store = GradientStore.open(path, mode="a")
    for c, name in enumerate(CHECKPOINTS):
        segment = store.new_capture_segment(name, writer="bench")
        write_rows(segment, 0, extra, gen, [1, c, n], chunk_rows, first_id=n)


# -- children (one process each: their own peak RSS) ---------------------------------------------------------------
def child_build(args) -> dict:
    import faiss

    from gradstore.store import GradientIndex, GradientStore, IndexOptions

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    store = GradientStore.open(args.store)
    options = IndexOptions(**json.loads(args.options))
    before, anon = peak_rss_bytes(), AnonPeak()
    start = time.perf_counter()
    GradientIndex.build(store, options, path=args.index, progress=False)
    elapsed, anon_peak = time.perf_counter() - start, anon.stop()
    return {
        "build_s": elapsed,
        "build_rss": peak_rss_bytes(),
        "build_anon": anon_peak,
        "build_rss_before": before,
        "bytes": dir_bytes(args.index),
    }


def child_update(args) -> dict:
    from gradstore.store import GradientIndex, GradientStore

    store = GradientStore.open(args.store)
    start = time.perf_counter()
    if args.mode == "update":
        GradientIndex.update(args.index, store)
    else:
        GradientIndex.rebuild(args.index, store, progress=False)
    return {"s": time.perf_counter() - start, "peak_rss": peak_rss_bytes()}


def read_bound_s(index_path: Path, repeats: int = 3) -> float:
    """Best time to stream the flat index's vector bytes (every file over 1 MB) through NumPy."""
    files = [p for p in Path(index_path).rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    arrays = [np.memmap(p, dtype=np.uint8, mode="r") for p in files]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the page cache
        start = time.perf_counter()
        for a in arrays:
            usable = len(a) // 4 * 4
            a[:usable].view(np.float32).sum(dtype=np.float32)
        best = min(best, time.perf_counter() - start)
    return best


def child_search(args) -> dict:
    from gradstore.store import GradientIndex, GradientStore, IndexOptions
    from gradstore.store.rows import CheckpointRows

    store = GradientStore.open(args.store)
    rss_before, anon = rss_bytes(), AnonPeak()
    options = IndexOptions(**json.loads(args.options))
    index = GradientIndex.open(args.index, store, options=options)
    raw = np.load(args.queries_file)[: args.num_queries].astype(np.float32)
    index.search(raw[:1], LRS, K)  # warm-up
    times, pro, opp = [], [], []
    for i in range(len(raw)):
        start = time.perf_counter()
        found = index.search(raw[i : i + 1], LRS, K)
        times.append(time.perf_counter() - start)
        pro.append(found.proponent_rows[0].tolist())
        opp.append(found.opponent_rows[0].tolist())
    out = {
        "p50_ms": 1e3 * float(np.percentile(times, 50)),
        "p99_ms": 1e3 * float(np.percentile(times, 99)),
        "search_rss": rss_bytes(),  # after loading and every query
        "search_anon": anon.stop(),
        "rss_before_open": rss_before,
        "pro": pro,
        "opp": opp,
    }
    if index.options.kind == "flat":
        out["bound_ms"] = 1e3 * read_bound_s(index.path)
    # the re-rank's fetch: k * rerank random rows of every checkpoint
    rows = {name: CheckpointRows(store, name) for name in index.checkpoints}
    rng = np.random.default_rng(0)
    fetch = []
    for _ in range(10):
        ids = np.sort(rng.choice(index.ids, size=min(len(index.ids), K * index.options.rerank), replace=False))
        start = time.perf_counter()
        for r in rows.values():
            r.read(ids)
        fetch.append(time.perf_counter() - start)
    out["fetch_rows"] = int(min(len(index.ids), K * index.options.rerank))
    out["fetch_ms"] = 1e3 * float(np.median(fetch))
    return out


CHILDREN = {"build": child_build, "search": child_search, "update": child_update}


def run_child(role: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--child", role]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{role} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recall(got: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


# -- driver --------------------------------------------------------------------------------------------------------
def run_size(n: int, args, workdir: Path) -> dict:
    from gradstore.store import GradientIndex

    store = workdir / f"n{n}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    log(f"N={n}: writing the store")
    write_s = make_store(store, n, args.dim, args.chunk_rows)
    queries = store.with_name(store.name + ".queries.npy")
    row: dict = {"n": n, "store_write_s": write_s, "store_bytes": dir_bytes(store)}
    approx = {"kind": args.kind, "on_disk": True, **({"nlist": args.nlist} if args.nlist else {})}
    kinds = {"flat": {"kind": "flat"}, args.kind: approx}
    for label, options in kinds.items():
        index = workdir / f"n{n}.{label}.index"
        log(f"N={n}: building {label}")
        row[label] = run_child("build", store=store, index=index, options=json.dumps(options))
        log(f"N={n}: searching {label} ({row[label]['build_s']:.1f} s build)")
        settings = [None] if label == "flat" else [None, *(int(p) for p in args.nprobe.split(",") if p)]
        row[label]["settings"] = [
            {"nprobe": nprobe}
            | run_child(
                "search",
                store=store,
                index=index,
                queries_file=queries,
                num_queries=args.queries,
                options=json.dumps(options | ({"nprobe": nprobe} if nprobe else {})),
            )
            for nprobe in settings
        ]
    truth = row["flat"]["settings"][0]
    for m in row[args.kind]["settings"]:
        m["recall_pro"], m["recall_opp"] = recall(m.pop("pro"), truth["pro"]), recall(m.pop("opp"), truth["opp"])
    truth.pop("pro"), truth.pop("opp")
    row["flat_over_bound"] = truth["p50_ms"] / truth["bound_ms"]
    if hasattr(GradientIndex, "update"):
        extra = max(1, n // 100)
        append_rows(store, n, extra, args.dim, args.chunk_rows)
        for label in kinds:
            index = workdir / f"n{n}.{label}.index"
            shutil.copytree(index, workdir / "rebuild.index", dirs_exist_ok=False)
            log(f"N={n}: update {label} (+{extra} rows) vs rebuild")
            row[label]["update"] = run_child("update", store=store, index=index, mode="update")
            row[label]["rebuild"] = run_child("update", store=store, index=workdir / "rebuild.index", mode="rebuild")
            shutil.rmtree(workdir / "rebuild.index")
    if not args.keep:
        for p in workdir.glob(f"n{n}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return row


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def markdown(rows: list[dict], kind: str) -> str:
    lines = [
        "| N | store | kind | build s | build peak RSS (+ over imports) / anon | index on disk | "
        "search RSS (+ over open) / anon peak | "
        f"p50 ms | p99 ms | recall@10 pro / opp | flat / bound | fetch {K}x rerank rows ms | update s / rebuild s |",
        "| --- " * 13 + "|",
    ]
    for r in rows:
        for label in ("flat", kind):
            m = r[label]
            upd = f"{m['update']['s']:.2f} / {m['rebuild']['s']:.2f}" if "update" in m else "n/a"
            for s in m["settings"]:
                if label == "flat":
                    name, rec = "flat", "1 (reference)"
                    bound = f"{r['flat_over_bound']:.2f}x ({s['bound_ms']:.1f} ms)"
                else:
                    name = f"{label} on_disk, nprobe {s['nprobe'] or 'default'}"
                    rec, bound = f"{s['recall_pro']:.3f} / {s['recall_opp']:.3f}", ""
                lines.append(
                    f"| {r['n']:,} | {fmt_bytes(r['store_bytes'])} | {name} | {m['build_s']:.1f} | "
                    f"{fmt_bytes(m['build_rss'])} (+{fmt_bytes(m['build_rss'] - m['build_rss_before'])}) / "
                    f"{fmt_bytes(m['build_anon'])} | "
                    f"{fmt_bytes(m['bytes'])} | "
                    f"{fmt_bytes(s['search_rss'])} (+{fmt_bytes(s['search_rss'] - s['rss_before_open'])}) / "
                    f"{fmt_bytes(s['search_anon'])} | "
                    f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {rec} | {bound} | {s['fetch_ms']:.1f} | {upd} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=1024, help="D per checkpoint")
    parser.add_argument("--kind", default="ivfsq", choices=["ivf", "ivfsq", "ivfpq"], help="on-disk kind")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--nlist", type=int, default=None, help="on-disk kind's nlist (default: IndexOptions')")
    parser.add_argument("--nprobe", default="16,64", help="extra nprobe settings measured beside the default")
    parser.add_argument("--chunk-rows", type=int, default=None, help="store chunk rows (default: the store's)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", default=None)
    # child-process arguments
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("store", "index", "options", "queries-file", "mode"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--num-queries", type=int, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.chunk_rows is None:
        import inspect

        from gradstore.store import GradientStore

        args.chunk_rows = inspect.signature(GradientStore.create).parameters["chunk_rows"].default
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradstore-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(run_size(n, args, workdir))
        print(markdown(rows, args.kind), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
