"""Serving latency and throughput on the digits demo run: in-process engine vs the real HTTP server.

Prepares the demo run (``prepare_demo``; reused when the workdir already holds a finished one), starts
``gradstore serve`` on a free loopback port (a subprocess by default: its own interpreter and GIL, as in
production; ``--server thread`` runs uvicorn in a thread of this process over the same engine), and
measures side by side in one run:

  single   one query at a time, n queries; in-process ``QueryEngine.influence``, raw HTTP (httpx,
           keep-alive) and the SDK ``Client`` interleaved query by query (so background load hits all
           three alike). p50/p99 of end to end and of the engine's gradient / search / assemble split;
           HTTP overhead = client-observed minus the server's ``took_ms`` (paired, per request), and the
           HTTP p50 minus the in-process p50.
  load     1, 8, 32 concurrent clients (asyncio, one ``AsyncClient`` = one keep-alive connection each)
           for a fixed duration: queries/s, client-observed p50/p99, server ``took_ms`` p50, errors.

  cpu      CPU time per query, which waiting for a core on a shared machine does not inflate: the
           in-process engine's (process time), the server process's per request (/proc), and the client's.
           Server CPU minus engine CPU is what the HTTP stack costs the server.

Everything is repeated ``--repeats`` times against the same server so the spread is visible on a noisy
machine. The in-process engine gets the server's torch thread setting (``serving_threads``). Prints
markdown tables and writes JSON.

    python benchmarks/serve.py [--workdir DIR] [--queries 200] [--duration 10] [--clients 1,8,32] [--repeats 3]

Targets (CPU): p50 <= 50 ms for one digits query over HTTP; HTTP adds <= 5 ms over the in-process engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

N_TEST = 297  # held-out digits of the demo (1797 - 1500)
TARGET_P50_MS = 50.0
TARGET_OVERHEAD_MS = 5.0


def _pct(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _summary(values) -> dict:
    return {
        "p50": _pct(values, 50),
        "p99": _pct(values, 99),
        "mean": float(np.mean(values)) if len(values) else None,
        "n": len(values),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server ----------------------------------------------------------------------------------
class Server:
    """``gradstore serve`` in a subprocess, or uvicorn in a thread over an existing engine."""

    def __init__(self, mode: str, config_path: Path, engine, log_path: Path, env: dict[str, str]):
        self.mode, self.port = mode, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = self._thread = self._uvicorn = None
        if mode == "subprocess":
            cmd = [
                sys.executable,
                "-m",
                "gradstore.server.cli",
                "serve",
                "--config",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
            self._log = open(log_path, "w")  # noqa: SIM115 -- the server's stdout for its whole life; closed in stop()
            self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        else:
            import uvicorn

            from gradstore.server.http.app import create_app

            config = uvicorn.Config(create_app(engine=engine), host="127.0.0.1", port=self.port, log_level="warning")
            self._uvicorn = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)
            self._thread.start()
        self._wait_ready(log_path)

    def _wait_ready(self, log_path: Path, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log_path}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server process has used (None for a thread server: not separable)."""
        if self._proc is None:
            return None
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._log.close()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._thread.join(10)


# -- phase 1: single queries, interleaved --------------------------------------------------------
def single(engine, server: Server, n: int, warmup: int, top_k: int) -> dict:
    import httpx

    from gradstore.server.client import Client

    http = httpx.Client(base_url=server.url, timeout=60.0)
    sdk = Client(server.url, timeout=60.0)
    rec = {
        k: []
        for k in (
            "inproc_e2e",
            "inproc_took",
            "inproc_gradient",
            "inproc_search",
            "inproc_assemble",
            "http_e2e",
            "http_took",
            "http_gradient",
            "http_search",
            "http_assemble",
            "http_overhead",
            "sdk_e2e",
            "sdk_overhead",
            "inproc_cpu",
            "http_client_cpu",
        )
    }
    mismatches = 0

    def inproc(payload):
        cpu, start = time.process_time(), time.perf_counter()  # process time: torch's worker threads count too
        r = engine.influence([payload], top_k=top_k)
        elapsed = (time.perf_counter() - start) * 1e3
        return (
            elapsed,
            r.took_ms,
            r.timings_ms,
            [p.id for p in r.results[0].proponents],
            (time.process_time() - cpu) * 1e3,
        )

    def raw(payload):
        body = {"queries": [payload], "top_k": top_k}
        cpu, start = time.thread_time(), time.perf_counter()
        response = http.post("/v1/influence", json=body)
        data = response.json()
        elapsed = (time.perf_counter() - start) * 1e3
        cpu = (time.thread_time() - cpu) * 1e3
        response.raise_for_status()
        return elapsed, data["took_ms"], data["timings_ms"], [p["id"] for p in data["results"][0]["proponents"]], cpu

    def typed(payload):
        start = time.perf_counter()
        r = sdk.influence([payload], top_k=top_k)
        elapsed = (time.perf_counter() - start) * 1e3
        return elapsed, r.took_ms, r.timings_ms, [p.id for p in r.results[0].proponents], None

    arms = [("inproc", inproc), ("http", raw), ("sdk", typed)]
    for i in range(warmup + n):
        if i == warmup:
            server_cpu = server.cpu_seconds()
        payload = {"test_index": i % N_TEST}
        out = {}
        for name, call in arms[i % 3 :] + arms[: i % 3]:  # rotate the order: no arm always runs first
            out[name] = call(payload)
        mismatches += out["http"][3] != out["inproc"][3] or out["sdk"][3] != out["inproc"][3]
        if i < warmup:
            continue
        for name in ("inproc", "http"):
            elapsed, took, timings = out[name][:3]
            rec[f"{name}_e2e"].append(elapsed)
            rec[f"{name}_took"].append(took)
            for part in ("gradient", "search", "assemble"):
                rec[f"{name}_{part}"].append(timings[part])
        rec["http_overhead"].append(out["http"][0] - out["http"][1])
        rec["sdk_e2e"].append(out["sdk"][0])
        rec["sdk_overhead"].append(out["sdk"][0] - out["sdk"][1])
        rec["inproc_cpu"].append(out["inproc"][4])
        rec["http_client_cpu"].append(out["http"][4])
    server_cpu_end = server.cpu_seconds()
    http.close()
    sdk.close()
    result = {k: _summary(v) for k, v in rec.items()}
    result["inproc_call_overhead"] = _summary(np.subtract(rec["inproc_e2e"], rec["inproc_took"]))
    result["mismatches"] = int(mismatches)
    # the server answers two requests per measured query (raw HTTP and SDK); its CPU time per request:
    result["server_cpu_per_request"] = None if server_cpu is None else (server_cpu_end - server_cpu) * 1e3 / (2 * n)
    return result


# -- phase 2: concurrent clients -----------------------------------------------------------------
async def _load(server: Server, clients: int, duration: float, warmup: float, top_k: int) -> dict:
    from gradstore.server.client import AsyncClient

    url = server.url
    start = time.perf_counter() + warmup
    end = start + duration
    latencies, took, errors = [], [], []
    cpu: dict[str, float | None] = {}

    async def meter() -> None:  # CPU time of the server and of this (client) process over the window
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu["server"], cpu["client"] = server.cpu_seconds(), time.process_time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        server_end = server.cpu_seconds()
        cpu["server"] = None if server_end is None else server_end - cpu["server"]
        cpu["client"] = time.process_time() - cpu["client"]

    async def worker(k: int) -> None:
        i = k
        async with AsyncClient(url, timeout=60.0, retries=0) as client:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    r = await client.influence([{"test_index": i % N_TEST}], top_k=top_k)
                except Exception as exc:
                    errors.append(repr(exc))
                    continue
                t1 = time.perf_counter()
                if start <= t1 <= end:  # completed in the window (throughput counts completions)
                    latencies.append((t1 - t0) * 1e3)
                    took.append(r.took_ms)
                i += clients

    await asyncio.gather(meter(), *(worker(k) for k in range(clients)))
    done = max(1, len(latencies))
    return {
        "clients": clients,
        "qps": len(latencies) / duration,
        "server_cpu_per_request": None if cpu["server"] is None else cpu["server"] * 1e3 / done,
        "client_cpu_per_request": cpu["client"] * 1e3 / done,
        "latency": _summary(latencies),
        "server_took": _summary(took),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
    }


def load(server: Server, clients: int, duration: float, warmup: float, top_k: int) -> dict:
    return asyncio.run(_load(server, clients, duration, warmup, top_k))


# -- report --------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _pp(s: dict) -> str:
    return f"{_f(s['p50'])} / {_f(s['p99'])}"


def _spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return _f(values[0])
    return f"{_f(float(np.median(values)))} ({_f(min(values))}–{_f(max(values))})"


def _verdict(values: list[float], target: float) -> str:
    return f"<= {target:.0f}: " + ("PASS" if max(values) <= target else "MISS" if min(values) > target else "MIXED")


def report(runs: list[dict], meta: dict) -> str:
    single_runs = [run["single"] for run in runs]

    def across(get) -> list[float]:
        return [get(s) for s in single_runs]

    lines = [
        f"## gradstore serve benchmark: {meta['server']} server, top_k={meta['top_k']}, {meta['queries']} single "
        f"queries x {len(runs)} repeats, {meta['cpus']} CPUs, torch threads {meta['torch_threads']}, "
        f"N={meta['num_examples']} D={meta['dim']} x {len(meta['checkpoints'])} checkpoints ({meta['index_kind']})",
        "",
        "### Single query, per repeat: p50 / p99 ms",
        "",
        "| repeat | path | end to end | gradient | search | assemble | overhead | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, (run, s) in enumerate(zip(runs, single_runs), 1):
        lines.append(
            f"| {r} | in-process engine | {_pp(s['inproc_e2e'])} | {_pp(s['inproc_gradient'])} "
            f"| {_pp(s['inproc_search'])} | {_pp(s['inproc_assemble'])} "
            f"| {_pp(s['inproc_call_overhead'])} (call − took_ms) | {run['loadavg_before']:.1f} |"
        )
        lines.append(
            f"| {r} | HTTP (httpx, keep-alive) | {_pp(s['http_e2e'])} | {_pp(s['http_gradient'])} "
            f"| {_pp(s['http_search'])} "
            f"| {_pp(s['http_assemble'])} | {_pp(s['http_overhead'])} (client − took_ms) | |"
        )
        lines.append(
            f"| {r} | SDK Client (typed) | {_pp(s['sdk_e2e'])} | | | | {_pp(s['sdk_overhead'])} (client − took_ms) | |"
        )
    http50, in50 = across(lambda s: s["http_e2e"]["p50"]), across(lambda s: s["inproc_e2e"]["p50"])
    over50 = across(lambda s: s["http_overhead"]["p50"])
    diff50 = [h - i for h, i in zip(http50, in50)]
    lines += [
        "",
        "### Single query, across repeats: median (min–max) of the repeats' values, ms",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| in-process engine end to end p50 | {_spread(in50)} | |",
        f"| HTTP end to end p50 | {_spread(http50)} | {_verdict(http50, TARGET_P50_MS)} |",
        f"| HTTP end to end p99 | {_spread(across(lambda s: s['http_e2e']['p99']))} | |",
        f"| HTTP gradient / search / assemble p50 (server) | {_spread(across(lambda s: s['http_gradient']['p50']))} / "
        f"{_spread(across(lambda s: s['http_search']['p50']))} / "
        f"{_spread(across(lambda s: s['http_assemble']['p50']))} | |",
        f"| HTTP overhead p50 (client-observed − server took_ms) | {_spread(over50)} "
        f"| {_verdict(over50, TARGET_OVERHEAD_MS)} |",
        f"| HTTP p50 − in-process p50 | {_spread(diff50)} | {_verdict(diff50, TARGET_OVERHEAD_MS)} |",
        f"| HTTP p99 − in-process p99 | {_spread(across(lambda s: s['http_e2e']['p99'] - s['inproc_e2e']['p99']))} | |",
        f"| answers differing from in-process | {sum(across(lambda s: s['mismatches']))} | 0 |",
    ]
    if single_runs[0]["server_cpu_per_request"] is not None:
        engine_cpu = across(lambda s: s["inproc_cpu"]["mean"])
        server_cpu = across(lambda s: s["server_cpu_per_request"])
        lines += [
            "",
            "### CPU time per query (insensitive to waiting for a core on a busy machine): median (min–max) ms",
            "",
            "| metric | value |",
            "|---|---|",
            f"| in-process engine (process CPU, mean) | {_spread(engine_cpu)} |",
            f"| server process per request (mean) | {_spread(server_cpu)} |",
            "| server − in-process engine = HTTP stack CPU in the server "
            f"| {_spread([a - b for a, b in zip(server_cpu, engine_cpu)])} |",
            f"| client (httpx thread CPU, mean) | {_spread(across(lambda s: s['http_client_cpu']['mean']))} |",
        ]
    lines += [
        "",
        f"### Concurrent clients ({meta['duration']:.0f} s each after {meta['load_warmup']:.0f} s warm-up): "
        "median (min–max) over repeats",
        "",
        "| clients | queries/s | p50 ms | p99 ms | server took_ms p50 | server CPU ms/req "
        "| client CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for j, c in enumerate(meta["clients"]):
        rows = [run["load"][j] for run in runs]
        server_cpu = [x["server_cpu_per_request"] for x in rows]
        lines.append(
            f"| {c} | {_spread([x['qps'] for x in rows])} | {_spread([x['latency']['p50'] for x in rows])} "
            f"| {_spread([x['latency']['p99'] for x in rows])} | {_spread([x['server_took']['p50'] for x in rows])} "
            f"| {'—' if None in server_cpu else _spread(server_cpu)} "
            f"| {_spread([x['client_cpu_per_request'] for x in rows])} "
            f"| {sum(x['errors'] for x in rows)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="demo run directory (default: a temporary one); reused if already prepared")
    parser.add_argument(
        "--queries", type=int, default=200, help="single queries per repeat (each over all three paths)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="single queries before measuring")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per concurrency level")
    parser.add_argument("--load-warmup", type=float, default=1.0, help="seconds of load before measuring each level")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--server", choices=["subprocess", "thread"], default="subprocess")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads here and in the server (sets OMP_NUM_THREADS; default: the server's own choice)",
    )
    parser.add_argument("--json", help="write results here (default: <workdir>/serve_bench.json)")
    args = parser.parse_args()

    env = {}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
        os.environ.update(env)  # before torch loads, so numpy/openblas and torch agree with the server

    import torch

    from gradstore.demos.digits import prepare_demo
    from gradstore.server.run import Run
    from gradstore.server.run.config import RunConfig

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gradstore-serve-bench-")
        args.workdir = tmp.name
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    config_path = prepare_demo(workdir, progress=False)
    print(f"demo run ready in {time.perf_counter() - t0:.1f} s: {config_path}", file=sys.stderr)
    config = RunConfig.load(config_path)
    run = Run(config)
    run.serving_threads()  # the in-process engine runs with the same torch threads as the server
    engine = run.open_engine()
    clients = [int(c) for c in args.clients.split(",") if c]
    meta = {
        "server": args.server,
        "top_k": args.top_k,
        "queries": args.queries,
        "duration": args.duration,
        "load_warmup": args.load_warmup,
        "clients": clients,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "num_examples": engine.index.num_rows,
        "dim": engine.store.dim,
        "checkpoints": engine.checkpoints,
        "index_kind": engine.index.options.kind,
        "device": str(engine.device),
        "env": env,
    }
    server = Server(args.server, config_path, engine, workdir / "serve_bench_server.log", env)
    runs = []
    try:
        for r in range(args.repeats):
            run = {"loadavg_before": os.getloadavg()[0]}
            print(f"repeat {r + 1}/{args.repeats}: single queries", file=sys.stderr)
            run["single"] = single(engine, server, args.queries, args.warmup if r == 0 else 5, args.top_k)
            run["load"] = []
            for c in clients:
                print(f"repeat {r + 1}/{args.repeats}: {c} concurrent clients", file=sys.stderr)
                run["load"].append(load(server, c, args.duration, args.load_warmup, args.top_k))
            run["loadavg_after"] = os.getloadavg()[0]
            runs.append(run)
    finally:
        server.stop()
    out = Path(args.json) if args.json else (Path.cwd() if tmp is not None else workdir) / "serve_bench.json"
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    table = report(runs, meta)
    print(table)
    out.write_text(json.dumps({"meta": meta, "runs": runs, "table": table}, indent=2))
    print(f"\nJSON: {out}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
