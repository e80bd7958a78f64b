"""Unauthenticated load against ``gradstore serve`` (issue 21): keyless 4 MiB bodies of long numbers must be refused
from their headers, unread, and must not slow down a legitimate client.

Prepares the digits demo run (reused when the workdir holds one), starts ``gradstore serve`` with an API key on a
free loopback port (a subprocess: its own interpreter and GIL, as in production), and measures:

  refusal   seconds from a keyless request's first byte to its answer's status line, sending a 4 MiB body of
            299-digit numbers (the worst case of the old whole-body regex) as fast as the socket takes it;
            and the status of a keyless junk body (401, not 422).
  idle      a legitimate influence query's latency (keep-alive httpx client, with the key), no other load.
  load      the same while ``--senders`` processes each send keyless 4 MiB bodies back to back (a new connection
            per body in one blocking write, as a plain client or a reconnecting attacker would), from before the
            first query to after the last: the legitimate query's latency, its ratio to idle, how many keyless
            bodies were refused per second, and the server's CPU use meanwhile (cores).

    python benchmarks/auth_first.py [--workdir DIR] [--senders 4] [--queries 40] [--json out.json]

Targets (issue 21): refusal < 0.5 s; legitimate p50 under load <= 2x idle p50.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

API_KEY = "benchmark-key"
MiB = 1024 * 1024
TARGET_REFUSAL_S = 0.5
TARGET_RATIO = 2.0


def long_numbers_body(size: int = 4 * MiB) -> bytes:
    """A JSON influence body of ``size`` bytes made of 299-digit numbers."""
    number = b"9" * 299
    count = (size - 64) // (len(number) + 1)
    return b'{"queries": [{"test_index": [' + b",".join([number] * count) + b"]}]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _head(port: int, length: int, key: str | None = None) -> bytes:
    lines = [
        "POST /v1/influence HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    if key:
        lines.append(f"X-API-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_once(port: int, body: bytes, key: str | None = None, chunk: int = 256 * 1024) -> tuple[int, float]:
    """One request on a new connection, the body sent in ``chunk``-byte writes until the server answers or closes;
    (status or 0, seconds from the first byte to the status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(_head(port, len(body), key))
        sock.setblocking(False)
        view, answer = memoryview(body), b""
        while b"\r\n" not in answer:
            try:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
                continue
            except BlockingIOError:
                pass
            except OSError:
                break
            if view:
                try:
                    view = view[sock.send(view[:chunk]) :]
                except BlockingIOError:
                    time.sleep(0.0005)
                except OSError:  # the server closed: read what it answered
                    sock.setblocking(True)
                    sock.settimeout(2)
                    with contextlib.suppress(OSError):
                        answer += sock.recv(4096)
                    break
            else:
                time.sleep(0.0005)
        seconds = time.perf_counter() - start
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, seconds


def send_blocking(port: int, body: bytes) -> int:
    """One request as a plain client sends it: the whole body in one blocking write, then the answer (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(_head(port, len(body)) + body)
        answer = b""
        with contextlib.suppress(OSError):
            answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _sender(port: int, stop: Any, counts: dict) -> None:
    body = long_numbers_body()
    statuses: dict[int, int] = {}
    while not stop.is_set():
        try:
            status = send_blocking(port, body)
        except OSError:
            status = 0
        statuses[status] = statuses.get(status, 0) + 1
    counts[os.getpid()] = statuses


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _query_latencies(url: str, n: int) -> list[float]:
    body = {"queries": [{"test_index": 3}], "top_k": 10}
    out = []
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        http.post("/v1/influence", json=body).raise_for_status()  # warm
        for _ in range(n):
            start = time.perf_counter()
            response = http.post("/v1/influence", json=body)
            out.append(time.perf_counter() - start)
            response.raise_for_status()
    return out


def _start_server(config: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "GRADSTORE_API_KEY": API_KEY, "GRADSTORE_WATCH_S": "0", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "gradstore.server.cli", "serve", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gradstore serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("gradstore serve not ready in 120 s")


def measure(config: Path, senders: int, queries: int, log: Path, warmup_s: float = 1.0) -> dict:
    proc, port = _start_server(config, log)
    url = f"http://127.0.0.1:{port}"
    try:
        body = long_numbers_body()
        refusals = [send_once(port, body) for _ in range(10)]
        junk_status, _ = send_once(port, b"{not json at all" * 1000)
        idle = _query_latencies(url, queries)
        manager = multiprocessing.Manager()
        counts, stop = manager.dict(), multiprocessing.Event()
        procs = [multiprocessing.Process(target=_sender, args=(port, stop, counts)) for _ in range(senders)]
        start, cpu_before = time.monotonic(), _cpu_s(proc.pid)
        for p in procs:
            p.start()
        time.sleep(warmup_s)  # the senders are at it
        loaded = _query_latencies(url, queries)  # while they go on
        stop.set()
        load_s, server_cpu_s = time.monotonic() - start, _cpu_s(proc.pid) - cpu_before
        for p in procs:
            p.join(timeout=60)
        statuses: dict[int, int] = {}
        for per_sender in counts.values():
            for status, n in per_sender.items():
                statuses[status] = statuses.get(status, 0) + n
        after = _query_latencies(url, max(5, queries // 4))
        log_bytes = log.stat().st_size
    finally:
        proc.kill()
        proc.wait()
    ms = lambda values: round(1e3 * statistics.median(values), 2)  # noqa: E731
    refusal_s = [seconds for _, seconds in refusals]
    result = {
        "refusal": {
            "statuses": sorted({status for status, _ in refusals}),
            "median_s": round(statistics.median(refusal_s), 4),
            "max_s": round(max(refusal_s), 4),
        },
        "junk_body_without_key": junk_status,
        "idle_p50_ms": ms(idle),
        "load_p50_ms": ms(loaded),
        "load_p90_ms": round(1e3 * sorted(loaded)[int(0.9 * (len(loaded) - 1))], 2),
        "after_p50_ms": ms(after),
        "ratio": round(statistics.median(loaded) / statistics.median(idle), 2),
        "senders": senders,
        "keyless_bodies": statuses,
        "load_s": round(load_s, 2),
        "keyless_per_s": round(sum(statuses.values()) / load_s, 1),
        "server_cpu_share_under_load": round(server_cpu_s / load_s, 2),
        "cpus": os.cpu_count(),
        "server_log_bytes": log_bytes,
    }
    result["ok"] = (
        result["refusal"]["statuses"] == [401]
        and result["refusal"]["max_s"] < TARGET_REFUSAL_S
        and junk_status == 401
        and result["ratio"] <= TARGET_RATIO
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gradstore-bench-demo")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--warmup-s", type=float, default=1.0, help="senders' head start before the queries")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    from gradstore.demos.digits import prepare_demo

    config = prepare_demo(args.workdir, progress=False)
    log = Path(tempfile.mkdtemp(prefix="auth-first-")) / "serve.log"
    result = measure(config, args.senders, args.queries, log, args.warmup_s)
    refusal = result["refusal"]
    print(
        f"keyless 4 MiB body: status {refusal['statuses']}, median {refusal['median_s']:.3f} s, "
        f"max {refusal['max_s']:.3f} s"
    )
    print(f"keyless junk body: {result['junk_body_without_key']}")
    print(
        f"legitimate query p50: idle {result['idle_p50_ms']} ms, under {result['senders']} keyless senders "
        f"{result['load_p50_ms']} ms (p90 {result['load_p90_ms']} ms; ratio {result['ratio']}), after "
        f"{result['after_p50_ms']} ms; keyless bodies refused {result['keyless_per_s']}/s {result['keyless_bodies']}; "
        f"server log {result['server_log_bytes']} bytes; server CPU under load {result['server_cpu_share_under_load']} "
        f"cores of {result['cpus']}"
    )
    print("OK" if result["ok"] else "MISSED a target")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
