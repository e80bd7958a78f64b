"""Soak test of the HTTP server: N concurrent clients (1, 8, 32, 64) for a bounded time against ``gradstore serve``
on loopback, on the digits demo run (prepared with ``prepare_demo``, as ``gradstore demo --no-serve`` does).

For each level: requests/s, client-observed p50 / p99, error counts by kind (HTTP status or transport error),
and every answer checked against the sequential answer to the same request (ids, order; numbers to 1e-5). Before
and after all levels: the server's RSS (/proc/<pid>/status) and the size of ``/metrics``. Prints a table and
writes JSON. ``--batching off,2,2+merge`` runs one server per item: ``off`` (no micro-batching), ``W`` (``[server]
batch_window_ms = W``, each request of a batch answered in turn: exact) or ``W+merge`` (also ``batch_merge = true``:
one forward/backward and one search per batch), alternating ``--rounds`` times so that all see the same load from
other processes on the machine. ``not bitwise`` counts answers equal to the sequential one in ids and order and in
numbers to 1e-5 only.

    python benchmarks/soak.py [--workdir runs/demo] [--duration 10] [--clients 1,8,32,64] [--batching off,2,2+merge]
        [--rounds 1] [--out soak.json]

Each client is one thread with one keep-alive httpx connection; requests cycle through a fixed mix (payload
influence queries of 1 and 3 examples, precomputed vectors, self-influence, an example, run info, and a 422).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.serving import ServeProcess, rss_kib

TIMING_KEYS = ("took_ms", "timings_ms")


def _requests(config: Path) -> list[tuple[str, dict | None]]:
    from gradstore.server.run import open_engine
    from gradstore.server.run.config import RunConfig

    engine = open_engine(RunConfig.load(config))
    raw = engine.query_gradients(engine.examples_from_payloads([{"test_index": 7}]), [1.0] * len(engine.checkpoints))
    return [("/v1/influence", {"queries": [{"test_index": i}], "top_k": 10}) for i in range(8)] + [
        ("/v1/influence", {"queries": [{"test_index": 1}, {"test_index": 2}, {"test_index": 3}], "top_k": 5}),
        ("/v1/influence", {"vectors": raw.tolist(), "top_k": 5}),
        ("/v1/influence", {"queries": [{"test_index": 10**6}]}),  # a 422: an answer too
        ("/v1/self-influence", {"top_k": 10}),
        ("/v1/examples/17", None),
        ("/v1/run", None),
    ]


def _plain(data: Any) -> Any:
    return {k: v for k, v in data.items() if k not in TIMING_KEYS} if isinstance(data, dict) else data


def _numbers(data: Any) -> list[float]:
    if isinstance(data, dict):
        return [x for v in data.values() for x in _numbers(v)]
    if isinstance(data, list):
        return [x for v in data for x in _numbers(v)]
    return [abs(data)] if isinstance(data, float) else []


def _same(a: Any, b: Any, scale: float | None = None) -> bool:
    """Equal, numbers to 1e-5 relative or 1e-5 of the answer's largest number (float32 rounding is relative to the
    summands of a score, so a small per-checkpoint contribution may differ by more than 1e-5 of itself)."""
    if scale is None:
        scale = max(_numbers(b), default=0.0)
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], scale) for k in b)
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(_same(x, y, scale) for x, y in zip(a, b))
    if isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=max(1e-9, 1e-5 * scale))
    return a == b


_SCORES = ("score", "contributions", "mean_abs_score", "max_abs_score")


def _ids(data: Any) -> Any:
    """The answer without its scores: ids, order, roles (what must match exactly)."""
    if isinstance(data, dict):
        return {k: _ids(v) for k, v in data.items() if k not in _SCORES}
    if isinstance(data, list):
        return [_ids(v) for v in data]
    return data


def _call(http: httpx.Client, path: str, body: dict | None) -> tuple[int, Any]:
    response = http.post(path, json=body) if body is not None else http.get(path)
    return response.status_code, _plain(response.json())


def run_level(url: str, requests: list, expected: list, clients: int, duration: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    mismatches = not_bitwise = 0
    lock = threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(n: int) -> None:
        nonlocal mismatches, not_bitwise
        mine: list[float] = []
        with httpx.Client(base_url=url, timeout=60) as http:
            start_barrier.wait()
            i = n
            while time.monotonic() < stop_at[0]:
                path, body = requests[i % len(requests)]
                t = time.perf_counter()
                try:
                    got = _call(http, path, body)
                except httpx.TransportError as exc:
                    with lock:
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    i += 1
                    continue
                mine.append(time.perf_counter() - t)
                want = expected[i % len(requests)]
                with lock:
                    if got[0] != want[0]:
                        errors[str(got[0])] = errors.get(str(got[0]), 0) + 1
                    elif not _same(got[1], want[1]) or _ids(got[1]) != _ids(want[1]):
                        mismatches += 1
                    elif got[1] != want[1]:
                        not_bitwise += 1  # equal ids and order; scores within float32 rounding (1e-5)
                i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + duration + 0.5  # set before release; the 0.5 s covers the release itself
    begin = time.monotonic()
    start_barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begin
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "errors": errors,
        "mismatches": mismatches,
        "not_bitwise": not_bitwise,
    }


def soak(config: Path, requests: list, batching: str, levels: list[int], duration: float) -> dict:
    """One server (``batching``: off, W or W+merge) through every level: figures, RSS, /metrics, tracebacks."""
    window, _, merge = batching.partition("+")
    log_path = config.parent / f"soak-serve-{batching}.log"
    env = {
        "GRADSTORE_WATCH_S": "1",
        "GRADSTORE_BATCH_WINDOW_MS": "0" if window == "off" else window,
        "GRADSTORE_BATCH_MERGE": str(merge == "merge").lower(),
    }
    with ServeProcess(config, log_path, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            expected = [_call(http, path, body) for path, body in requests]
            http.get("/metrics")  # /metrics' own labels appear from the second call on
            metrics_before = len(http.get("/metrics").content)
        rss_before = rss_kib(server.proc.pid)
        results = [run_level(server.url, requests, expected, n, duration) for n in levels]
        rss_after = rss_kib(server.proc.pid)
        metrics_after = len(httpx.get(f"{server.url}/metrics").content)
        tracebacks = server.log().count("Traceback")
    return {
        "batching": batching,
        "levels": results,
        "server_rss_mib": {"before": round(rss_before / 1024, 1), "after": round(rss_after / 1024, 1)},
        "metrics_bytes": {"before": metrics_before, "after": metrics_after},
        "server_tracebacks": tracebacks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="demo run directory (default: a temporary one); reused if prepared")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrency levels")
    parser.add_argument("--batching", default="off", help="server configurations to compare, e.g. off,2,2+merge")
    parser.add_argument("--rounds", type=int, default=1, help="times each window is run, alternating")
    parser.add_argument("--out", default="soak.json", help="JSON results file")
    args = parser.parse_args()

    from gradstore.demos.digits import prepare_demo

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradstore-soak-"))
    config = prepare_demo(workdir, progress=False)
    requests = _requests(config)
    levels = [int(n) for n in args.clients.split(",") if n]
    configurations = [b for b in args.batching.split(",") if b]
    runs = [soak(config, requests, b, levels, args.duration) for _ in range(args.rounds) for b in configurations]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "duration_s": args.duration,
        "runs": runs,
    }
    print("| batching | clients | requests | req/s | p50 ms | p99 ms | errors | mismatches | not bitwise |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for level in run["levels"]:
            errors = ", ".join(f"{k}: {v}" for k, v in level["errors"].items()) or "0"
            print(
                f"| {run['batching']} | {level['clients']} | {level['requests']} | {level['rps']} "
                f"| {level['p50_ms']} | {level['p99_ms']} | {errors} | {level['mismatches']} | {level['not_bitwise']} |"
            )
    for run in runs:
        rss, size = run["server_rss_mib"], run["metrics_bytes"]
        print(
            f"batching {run['batching']}: server RSS {rss['before']} -> {rss['after']} MiB; "
            f"/metrics {size['before']} -> {size['after']} bytes; tracebacks in the server log: "
            f"{run['server_tracebacks']}"
        )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
