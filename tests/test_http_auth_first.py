"""Issue 21, HTTP side: refusals decided from headers alone (API key, route, sizes), so an unauthenticated body is
never read or parsed; large bodies parsed and validated off the event loop; strict request models; an empty API
key refused at start; the end of a drain answered 503 + Retry-After; per-client connection cap and rate-limited
logs under reconnect storms; /readyz without paths for keyless clients; header blocks over the limit in one write.

Servers run on loopback: the app under uvicorn in a thread where the test needs to look inside (what the app read,
the drain), ``gradstore serve`` in a subprocess where it needs the process (latency under load, the log).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gradstore.server import cli
from gradstore.server.errors import ConfigError
from gradstore.server.http import app as app_module
from gradstore.server.http.app import create_app
from gradstore.server.http.serving import LOG_BURST, GradstoreServer, LogRateLimit, uvicorn_config
from gradstore.server.http.watch import Unavailable
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig, ServerConfig

from .helpers.serving import ServeProcess, free_port

API_KEY = "auth-first-key"
MiB = 1024 * 1024
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "auth_first.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("auth_first_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # multiprocessing pickles its sender function by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(demo_config):
    return open_engine(RunConfig.load(demo_config))


class _Counting:
    """An ASGI app counting the body bytes the app below it asked for (``received``)."""

    def __init__(self, app):
        self.app, self.state, self.received = app, app.state, 0

    async def __call__(self, scope, receive, send):
        async def counting():
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counting, send)


class _ThreadServer:
    """``app`` under gradstore's uvicorn server in a thread: ``url``, ``port``, ``server``; ``stop()``."""

    def __init__(self, app, settings: ServerConfig):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, "127.0.0.1", self.port, settings, log_level="info")
        self.server = GradstoreServer(config, app.state.lifecycle, settings.drain_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def keyed(engine):
    """The demo engine behind an API key, the app wrapped to count the body bytes it reads."""
    settings = ServerConfig(api_key=API_KEY, max_top_k=20, max_queries=4)
    counting = _Counting(create_app(engine=engine, settings=settings))
    server = _ThreadServer(counting, settings)
    yield server, counting
    server.stop()


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` in one write; what the server answers (up to the end of its headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# -- the body of a refused request is never read or parsed ----------------------------------------------------------


def test_keyless_bodies_are_refused_from_headers_unread_and_unparsed(keyed, monkeypatch):
    server, counting = keyed
    bench = _benchmark()
    parsed: list[int] = []
    real = app_module.strict_json
    monkeypatch.setattr(app_module, "strict_json", lambda body: parsed.append(len(body)) or real(body))
    long_numbers = bench.long_numbers_body()
    assert len(long_numbers) > 4 * MiB - 1024
    before = counting.received
    timings = []
    for body in (long_numbers, b"{not json at all" * 1000, b""):
        status, seconds = bench.send_once(server.port, body)
        assert status == 401, (status, body[:40])
        timings.append(seconds)
    assert max(timings) < 0.5, timings
    assert counting.received == before and not parsed  # nothing of those bodies reached the app
    # unknown routes are answered without their body too; the API key is asked before the route is looked up
    assert bench.send_once(server.port, long_numbers)[0] == 401
    answer = _raw(server.port, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n" + b"1" * 65536)
    assert _status(answer) == 404 and b"connection: close" in answer.lower()
    assert counting.received == before and not parsed
    # with the key, the junk body is read and refused by the parser
    headers = {"X-API-Key": API_KEY, "content-type": "application/json"}
    response = httpx.post(f"{server.url}/v1/influence", content=b"{not json", headers=headers)
    assert response.status_code == 422 and parsed
    print(f"\nkeyless 4 MiB body of long numbers refused in {timings[0] * 1e3:.1f} ms (junk {timings[1] * 1e3:.1f} ms)")


def test_two_api_key_headers_are_refused(keyed):
    server, _ = keyed
    body = b'{"queries": [{"test_index": 0}], "top_k": 2}'
    for extra in (
        [("X-API-Key", API_KEY), ("X-API-Key", API_KEY)],
        [("X-API-Key", "wrong"), ("X-API-Key", API_KEY)],
        [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {API_KEY}")],
    ):
        response = httpx.post(f"{server.url}/v1/influence", content=body, headers=[*extra, ("content-type", "json")])
        assert response.status_code in (400, 401), (extra, response.text)
        assert "API key" in response.json()["detail"]
    ok = httpx.post(
        f"{server.url}/v1/influence", content=body, headers={"X-API-Key": API_KEY, "content-type": "application/json"}
    )
    assert ok.status_code == 200, ok.text


def test_large_authenticated_bodies_are_parsed_off_the_event_loop(keyed):
    """A 4 MiB body of small ints (about 1 s to parse and validate here) does not hold up /healthz."""
    server, _ = keyed
    body = b'{"vectors": [[[' + b",".join([b"1"] * (2 * MiB - 64)) + b"]]]}"
    outcome: list[int] = []

    def post() -> None:
        response = httpx.post(f"{server.url}/v1/influence", content=body, headers={"X-API-Key": API_KEY}, timeout=60)
        outcome.append(response.status_code)

    sender = threading.Thread(target=post)
    sender.start()
    gaps = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        while sender.is_alive():
            start = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            gaps.append(time.perf_counter() - start)
    sender.join()
    assert outcome and 400 <= outcome[0] < 500, outcome  # the vectors do not fit the index
    assert len(gaps) >= 3, gaps
    print(f"\n/healthz during a 4 MiB authenticated parse: {len(gaps)} answers, slowest {max(gaps) * 1e3:.0f} ms")
    assert max(gaps) < 0.4, gaps


@pytest.mark.slow
def test_legitimate_queries_are_answered_under_keyless_4mib_senders(demo_config, tmp_path):
    """benchmarks/auth_first.py, small: 3 processes sending keyless 4 MiB bodies back to back."""
    bench = _benchmark()
    result = bench.measure(demo_config, senders=3, queries=15, log=tmp_path / "serve.log")
    print(f"\n{json.dumps(result)}")
    assert result["refusal"]["statuses"] == [401] and result["refusal"]["max_s"] < 0.5, result
    assert result["junk_body_without_key"] == 401
    assert result["keyless_bodies"].get(401, 0) >= 10, result
    # The latency ratio under load (within 2x of idle) is a benchmark figure (benchmarks/auth_first.py, README), not an
    # assertion: on 2 shared cores 3 sender processes contend for the CPU whatever the server does. What the server
    # controls is asserted: every keyed query is answered while the keyless bodies are refused unread.
    assert result["load_p50_ms"] > 0 and result["idle_p50_ms"] > 0, result


# -- strict request models ------------------------------------------------------------------------------------------

PAD = {"pad": "x" * 8000}  # makes a body large enough to be parsed in a worker thread


@pytest.mark.parametrize("large", [False, True], ids=["inline", "threaded"])
def test_public_request_models_take_no_coercion(keyed, large):
    server, _ = keyed
    query = {"test_index": 0, **(PAD if large else {})}
    refused = {
        "/v1/influence": [
            ({"queries": [query], "top_k": True}, "top_k"),
            ({"queries": [query], "top_k": "5"}, "top_k"),
            ({"queries": [query], "top_k": 5.0}, "top_k"),
            ({"queries": [query], "normalize": 1}, "normalize"),
            ({"queries": [query], "checkpoints": "epoch-1"}, "checkpoints"),
            ({"vectors": [[[True]]], **({"checkpoints": [], "x": PAD} if large else {})}, "vectors"),
        ],
        "/v1/explain": [({"query": query, "example_id": "3"}, "example_id")],
        "/v1/self-influence": [({"top_k": "5", **({"lr_weighting": None, "x": PAD} if large else {})}, "top_k")],
    }
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        for path, cases in refused.items():
            for body, field in cases:
                response = http.post(path, json=body)
                assert response.status_code == 422, (path, body, response.text[:300])
                locs = [e["loc"] for e in response.json()["detail"] if isinstance(e, dict)]
                assert ["body", field] in [loc[:2] for loc in locs], (path, field, response.text[:300])
        ok = http.post("/v1/influence", json={"queries": [query], "top_k": 3})
        assert ok.status_code == 200 and len(ok.json()["results"][0]["proponents"]) == 3
        assert http.post("/v1/self-influence", json={"top_k": 2}).status_code == 200


# -- start-up, /readyz, header size --------------------------------------------------------------------------------


def test_empty_api_key_is_refused_at_start(demo_config, monkeypatch, capsys):
    for key in ("", "   "):
        with pytest.raises(ValueError, match="API key is empty"):
            ServerConfig(api_key=key)
    monkeypatch.setenv("GRADSTORE_API_KEY", "")
    with pytest.raises(ConfigError, match="server.api_key: the API key is empty"):
        RunConfig.load(demo_config)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--config", str(demo_config), "--port", str(free_port())])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: server.api_key: the API key is empty") and "Traceback" not in err, err


def test_readyz_names_files_only_to_clients_with_the_key(keyed):
    server, counting = keyed
    app = counting.app
    app.state.unavailable = Unavailable(ConfigError("index /secret/place/demo.index is damaged; rebuild it"))
    try:
        keyless = httpx.get(f"{server.url}/readyz")
        keyed_answer = httpx.get(f"{server.url}/readyz", headers={"X-API-Key": API_KEY})
        wrong = httpx.get(f"{server.url}/readyz", headers={"X-API-Key": "wrong"})
    finally:
        app.state.unavailable = None
    assert keyless.status_code == wrong.status_code == keyed_answer.status_code == 503
    assert "/secret" not in keyless.text and "/secret" not in wrong.text and "API key" in keyless.json()["reason"]
    assert "/secret/place/demo.index" in keyed_answer.json()["reason"]


def test_header_blocks_over_the_limit_are_refused_in_one_write(keyed):
    server, counting = keyed
    before = counting.received
    for size in (17_000, 40_000, 120_000):
        request = b"GET /v1/run HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * size + b"\r\n\r\n"
        answer = _raw(server.port, request)
        assert _status(answer) in (400, 431), (size, answer[:200])
    body = (
        b"POST /v1/influence HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\nContent-Length: 9\r\n\r\n{ junk }"
    )
    assert _status(_raw(server.port, body)) in (400, 431) and counting.received == before
    fits = b"GET /v1/run HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode() + b"\r\nX-Pad: " + b"a" * 15_000
    assert _status(_raw(server.port, fits + b"\r\n\r\n")) == 200


# -- drain, reconnect storms, log rate ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """Log lines as formatted, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_requests_in_flight_when_the_drain_ends_get_503_with_retry_after(engine):
    """drain_s = 1 and requests that take 4 s: the ones in flight are answered 503 + Retry-After at the end of
    the drain (no 500, no traceback); the server is gone well within a second after it."""
    settings = ServerConfig(drain_s=1.0)
    app = create_app(engine=engine, settings=settings)

    started = threading.Semaphore(0)

    class Slow:
        def __getattr__(self, name):
            return getattr(engine, name)

        def answer_influence(self, body):
            started.release()
            time.sleep(4)
            return engine.answer_influence(body)

    app.state.engine = Slow()
    server = _ThreadServer(app, settings)  # (uvicorn configures its loggers here: collect after)
    collected = _Collect()
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addHandler(collected)
    body = {"queries": [{"test_index": 1}], "top_k": 2}
    answers: list[httpx.Response] = []

    def client() -> None:
        answers.append(httpx.post(f"{server.url}/v1/influence", json=body, timeout=30))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    for _ in clients:  # all three in flight
        assert started.acquire(timeout=20)
    start = time.monotonic()
    server.server.handle_exit(signal.SIGTERM, None)
    late = httpx.post(f"{server.url}/v1/influence", json=body, timeout=10)
    for thread in clients:
        thread.join(timeout=10)
    server.thread.join(timeout=10)
    exited = time.monotonic() - start
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert [a.status_code for a in answers] == [503, 503, 503], [a.text for a in answers]
    assert all(a.headers.get("retry-after") == "1" for a in answers), [(a.headers, a.text) for a in answers]
    assert all("shut down before this request was answered" in a.json()["detail"] for a in answers), [
        a.text for a in answers
    ]
    assert not server.thread.is_alive() and exited < 1.0 + 0.8, exited
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).removeHandler(collected)
    log = "\n".join(collected.lines)
    assert "drain over: 3 request(s)" in log, log
    assert "Traceback" not in log and "Exception in ASGI" not in log and '" 500' not in log, log
    print(f"\ndrain over: 3 in-flight requests answered 503; server gone {exited:.2f} s after the signal")


@pytest.mark.slow
def test_reconnect_storm_is_capped_per_client_and_its_log_rate_limited(demo_config, tmp_path):
    """Clients on 127.0.0.1 reconnect as fast as they can, each holding a half-sent request, and burst short
    connections: they get at most max_connections_per_client slots, so a client on 127.0.0.2 is answered every
    time, and the log grows by a few KB, not MB."""
    env = {
        "GRADSTORE_MAX_CONNECTIONS": "60",
        "GRADSTORE_MAX_CONNECTIONS_PER_CLIENT": "20",
        "GRADSTORE_HEADER_TIMEOUT_S": "0.5",
        "GRADSTORE_WATCH_S": "0",
    }
    storm_s = 6.0
    with ServeProcess(demo_config, tmp_path / "serve.log", env=env) as server:
        log_before = len(server.log())
        stop = time.monotonic() + storm_s
        attempts = [0]

        def storm() -> None:
            held: list[socket.socket] = []
            while time.monotonic() < stop:
                try:
                    sock = socket.create_connection(("127.0.0.1", server.port), timeout=1)
                    sock.sendall(b"POST /v1/influence HTTP/1.1\r\nHost: x\r\n")
                    held.append(sock)
                except OSError:
                    pass
                attempts[0] += 1
                time.sleep(0.004)
                if len(held) > 40:
                    held.pop(0).close()
            for sock in held:
                sock.close()

        storms = [threading.Thread(target=storm) for _ in range(4)]
        for thread in storms:
            thread.start()
        time.sleep(1.0)
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        statuses = []
        with httpx.Client(base_url=server.url, transport=transport, timeout=10) as http:
            while time.monotonic() < stop:
                response = http.post("/v1/influence", json={"queries": [{"test_index": 2}], "top_k": 3})
                statuses.append(response.status_code)
                time.sleep(0.1)
        for thread in storms:
            thread.join(timeout=10)
        grown = len(server.log()) - log_before
        log = server.log()
    per_minute = grown * 60 / storm_s
    print(
        f"\nreconnect storm: {attempts[0]} connects in {storm_s:.0f} s; legitimate answers {statuses.count(200)}/"
        f"{len(statuses)}; log +{grown} bytes ({per_minute / 1024:.0f} KiB/min)"
    )
    assert statuses and set(statuses) == {200}, statuses
    assert attempts[0] > 200
    assert "(server.max_connections_per_client)" in log
    for kind in ("(server.max_connections_per_client)", "(server.header_timeout_s)", "(server.max_connections)"):
        assert log.count(kind) <= LOG_BURST, (kind, log[-3000:])  # one window of the rate limit
    assert per_minute < 200 * 1024, grown
    assert "Traceback" not in log


def _record(msg: str, args: tuple = (), name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def _access(status: int) -> logging.LogRecord:
    return _record('%s - "%s %s HTTP/%s" %d', ("127.0.0.1:1", "GET", "/", "1.1", status), "uvicorn.access")


def test_log_rate_limit_counts_what_it_leaves_out():
    limit = LogRateLimit(burst=3, period_s=0.3)
    passed = [limit.filter(_record("refused %s", (f"127.0.0.1:{i}",))) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(_record("another kind"))  # counted per kind
    time.sleep(0.35)
    next_one = _record("refused %s", ("127.0.0.1:2",))
    assert limit.filter(next_one) and "7 more like this" in next_one.getMessage()
    assert all(limit.filter(_access(200)) for _ in range(10))  # answers under 400 are never left out
    assert [limit.filter(_access(401)) for _ in range(5)] == [True] * 3 + [False] * 2
