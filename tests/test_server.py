"""The HTTP service, the client SDK and the CLI on the embedded digits demo run (issue 4, tests 1, 3, 4).

1. End to end on loopback: ``gradstore serve`` runs in a subprocess on a free port; queries through the
   SDK (sync and async) and raw httpx equal ``gradstore query --json`` and the in-process engine
   (ids, order, scores, contributions, descriptions; ``took_ms``/``timings_ms`` aside).
3. Auth and bad input: a server with an API key refuses missing or wrong keys with 401; every client
   mistake is a 4xx whose message says what is wrong, and the SDK raises it as GradstoreAPIError.
4. 32 concurrent clients for a bounded time: no errors, every answer equal to the sequential one.
(2, schema fuzzing, is tests/test_fuzz.py.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradstore.server import cli
from gradstore.server.client import AsyncClient, Client, GradstoreAPIError
from gradstore.server.http.app import API_KEY_ENV, create_app
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig, ServerConfig
from gradstore.server.run.schemas import RunInfo

from .helpers.serving import serve_in_thread

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),  # starlette's TestClient notice
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # the 1e300-vectors case
]

API_KEY = "s3cret-key"
LIMITS = dict(max_top_k=20, max_queries=4, max_body_bytes=100_000)
CONCURRENT_CLIENTS = 32
CONCURRENT_SECONDS = 5.0
TIMING_KEYS = ("took_ms", "timings_ms")


# -- helpers -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answer(response) -> dict:
    """A response as plain JSON data without its timings (they differ from call to call)."""
    data = response.model_dump(mode="json") if hasattr(response, "model_dump") else dict(response)
    return {k: v for k, v in data.items() if k not in TIMING_KEYS}


def _assert_same(actual, expected, rel: float = 0.0, where: str = "answer") -> None:
    """Equal structure, ids, order and descriptions; floats equal (or within ``rel`` when given)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (
            f"{where}: keys {actual!r} != {expected!r}"
        )
        for key in expected:
            _assert_same(actual[key], expected[key], rel, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, rel, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        ok = actual == expected if rel == 0 else math.isclose(actual, expected, rel_tol=rel, abs_tol=rel * 1e-3)
        assert ok, f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def _message(response: httpx.Response) -> str:
    """The ``detail`` of an error response as one line (FastAPI's field errors joined, with their loc)."""
    detail = response.json()["detail"]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
    return detail


def _samples(url: str, headers: dict | None = None) -> dict:
    """Prometheus samples of ``/metrics`` keyed by (sample name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_config):
    """The in-process query engine of the demo run (the reference the server must agree with)."""
    return open_engine(RunConfig.load(demo_config))


@pytest.fixture(scope="module")
def queries(engine) -> list[dict]:
    """Held-out digits by index, and one drawn digit (a test image's pixels) with a wrong label."""
    task = engine.task
    pixels = task.pixels[task.n_train + 11].astype(int).tolist()
    wrong = (int(task.labels[task.n_train + 11]) + 3) % 10
    return [{"test_index": 0}, {"test_index": 42}, {"pixels": pixels, "label": wrong}]


@pytest.fixture(scope="module")
def live_url(demo_config, tmp_path_factory):
    """``gradstore serve --config <demo run.toml>`` in a subprocess on a free loopback port."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(API_KEY_ENV, None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradstore.server.cli",
                "serve",
                "--config",
                str(demo_config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gradstore serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gradstore serve not ready after 120 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _secured_app(engine):
    return create_app(engine=engine, settings=ServerConfig(api_key=API_KEY, **LIMITS))


@pytest.fixture(scope="module")
def secured_url(engine):
    """An app with an API key and tight limits, served by uvicorn on loopback in a background thread."""
    with serve_in_thread(_secured_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def secured_client(engine):
    """The same secured app in process (fastapi's TestClient), sending the right key."""
    from fastapi.testclient import TestClient

    with TestClient(_secured_app(engine), headers={"X-API-Key": API_KEY}, raise_server_exceptions=False) as client:
        yield client


def _cli_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    cli.main(argv)
    return json.loads(capsys.readouterr().out)


# -- 1. end to end on loopback -------------------------------------------------------------------------


OPTION_SETS = {
    "defaults": dict(top_k=7),
    "uniform-subset-measurement": dict(
        top_k=5, lr_weighting="uniform", checkpoints=["epoch-1", "epoch-3"], measurement="measurement"
    ),
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_e2e_sdk_http_cli_and_engine_agree(live_url, engine, queries, demo_config, tmp_path, capsys, options):
    query_file = tmp_path / "queries.jsonl"
    query_file.write_text("".join(json.dumps(q) + "\n" for q in queries))
    argv = [
        "query",
        "--config",
        str(demo_config),
        "--query-file",
        str(query_file),
        "--top-k",
        str(options["top_k"]),
        "--json",
    ]
    if "lr_weighting" in options:
        argv += ["--lr-weighting", options["lr_weighting"]]
    if "checkpoints" in options:
        argv += ["--checkpoints", ",".join(options["checkpoints"])]
    if "measurement" in options:
        argv += ["--measurement", options["measurement"]]
    expected = _answer(_cli_json(capsys, argv))

    _assert_same(_answer(engine.influence(queries, **options)), expected, where="engine")
    with Client(live_url) as client:
        _assert_same(_answer(client.influence(queries, **options)), expected, where="Client")

    async def via_async() -> list:
        async with AsyncClient(live_url) as client:
            # the whole batch, and each query in its own concurrent request
            whole = client.influence(queries, **options)
            singles = [client.influence([q], **options) for q in queries]
            return await asyncio.gather(whole, *singles)

    whole, *singles = asyncio.run(via_async())
    _assert_same(_answer(whole), expected, where="AsyncClient")
    for i, single in enumerate(singles):
        # alone in its batch: same examples and order; float32 sums over a batch of 1 instead of 3 round apart
        _assert_same(
            _answer(single), {**expected, "results": [expected["results"][i]]}, rel=1e-4, where=f"AsyncClient[{i}]"
        )

    raw = httpx.post(f"{live_url}/v1/influence", json={"queries": queries, **options}, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    body = raw.json()
    assert body["took_ms"] > 0 and set(body["timings_ms"]) >= {"gradient", "search"}
    _assert_same(_answer(body), expected, where="httpx")

    # the answer is what it says it is: per-query results, descriptions, weights, per-checkpoint terms
    chosen = options.get("checkpoints", engine.checkpoints)
    assert expected["checkpoints"] == list(chosen)
    assert list(expected["weights"]) == list(chosen)
    assert expected["lr_weighting"] == options.get("lr_weighting", "schedule")
    assert len(expected["results"]) == len(queries)
    assert expected["results"][2]["query"]["pixels"] == queries[2]["pixels"]
    for result in expected["results"]:
        for side in ("proponents", "opponents"):
            assert len(result[side]) == options["top_k"]
            for item in result[side]:
                assert list(item["contributions"]) == list(chosen)
                assert sum(item["contributions"].values()) == pytest.approx(item["score"], rel=1e-4, abs=1e-6)
                assert item["example"] == engine.describe(item["id"])
        proponent_scores = [p["score"] for p in result["proponents"]]
        opponent_scores = [o["score"] for o in result["opponents"]]
        assert proponent_scores == sorted(proponent_scores, reverse=True)
        assert opponent_scores == sorted(opponent_scores)
        assert proponent_scores[0] > opponent_scores[0]


def test_precomputed_vectors_equal_payload_queries(live_url, engine, queries):
    """Projected query gradients sent as ``vectors`` give the payload queries' proponents and opponents."""
    examples = engine.examples_from_payloads(queries)
    raw = engine.query_gradients(examples, engine.checkpoint_weights(None, "schedule"))  # [B, C, D], unweighted
    assert raw.shape == (len(queries), len(engine.checkpoints), engine.store.dim)

    subset = ["epoch-0", "epoch-2"]
    sliced = raw[:, [engine.checkpoints.index(c) for c in subset]]
    with Client(live_url) as client:
        for vectors, extra in ((raw, {}), (sliced, {"checkpoints": subset, "lr_weighting": "normalized"})):
            by_payload = _answer(client.influence(queries, top_k=6, **extra))
            by_vector = _answer(client.influence(vectors=vectors, top_k=6, **extra))
            assert all(r["query"] is None for r in by_vector["results"])
            for r in by_payload["results"]:
                r["query"] = None
            _assert_same(by_vector, by_payload, where=f"vectors {extra}")
            # lists over raw HTTP, and the in-process engine, agree too
            body = {"vectors": vectors.tolist(), "top_k": 6, **extra}
            _assert_same(
                _answer(httpx.post(f"{live_url}/v1/influence", json=body, timeout=60).json()), by_vector, where="httpx"
            )
            _assert_same(_answer(engine.influence(vectors=vectors, top_k=6, **extra)), by_vector, where="engine")

    async def via_async():
        async with AsyncClient(live_url) as client:
            return await client.influence(vectors=raw[:1], top_k=3)

    answer = asyncio.run(via_async())
    _assert_same(_answer(answer), _answer(engine.influence(vectors=raw[:1], top_k=3)), where="AsyncClient vectors")


def test_examples_run_and_self_influence(live_url, engine, demo_config):
    config = RunConfig.load(demo_config)
    with Client(live_url) as client:
        assert client.ready()
        for example_id in (0, 3, 1499):
            assert client.example(example_id) == engine.describe(example_id)
        info = client.run()
        self_inf = client.self_influence(top_k=15, lr_weighting="uniform")
    assert isinstance(info, RunInfo) and info == engine.run_info()
    assert [(c.name, c.lr) for c in info.checkpoints] == [(c.name, c.lr) for c in config.checkpoints]
    assert info.index.rows == len(engine.task.train_examples()) == 1500
    assert info.dim == engine.store.dim and info.index.kind == "flat"

    raw = httpx.get(f"{live_url}/v1/examples/3")
    assert raw.status_code == 200 and raw.json() == {"id": 3, "example": engine.describe(3)}
    example = raw.json()["example"]
    assert set(example) >= {"label", "pixels", "true_label", "flipped"} and len(example["pixels"]) == 64

    _assert_same(
        _answer(self_inf), _answer(engine.self_influence(top_k=15, lr_weighting="uniform")), where="self-influence"
    )
    scores = [r.score for r in self_inf.results]
    assert len(scores) == 15 and scores == sorted(scores, reverse=True) and scores[-1] > 0

    async def via_async():
        async with AsyncClient(live_url) as client:
            return await asyncio.gather(client.example(7), client.run(), client.self_influence(top_k=5))

    example7, info2, top5 = asyncio.run(via_async())
    assert example7 == engine.describe(7) and info2 == info
    _assert_same(_answer(top5), _answer(engine.self_influence(top_k=5)), where="async self-influence")


def test_health_readiness_docs_dashboard(live_url):
    assert httpx.get(f"{live_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{live_url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    spec = httpx.get(f"{live_url}/openapi.json").json()
    assert {"/v1/influence", "/v1/self-influence", "/v1/examples/{example_id}", "/v1/run"} <= set(spec["paths"])
    assert httpx.get(f"{live_url}/docs").status_code == 200
    page = httpx.get(f"{live_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_metrics_count_requests_and_time_gradient_and_search(live_url, queries):
    before = _samples(live_url)
    with Client(live_url) as client:
        client.influence(queries[:2], top_k=3)
        client.influence([queries[2]], top_k=3)
        client.run()
        with pytest.raises(GradstoreAPIError):
            client.example(10**6)
    after = _samples(live_url)

    def delta(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("gradstore_requests_total", route="/v1/influence", status="200") == 2
    assert delta("gradstore_requests_total", route="/v1/run", status="200") == 1
    assert delta("gradstore_requests_total", route="/v1/examples/{example_id}", status="404") == 1
    assert delta("gradstore_request_seconds_count", route="/v1/influence") == 2
    assert delta("gradstore_request_seconds_sum", route="/v1/influence") > 0
    for histogram in ("gradstore_gradient_seconds", "gradstore_search_seconds"):
        assert delta(f"{histogram}_count") == 2
        assert delta(f"{histogram}_sum") > 0
        assert _sample(after, f"{histogram}_bucket", le="+Inf") == _sample(after, f"{histogram}_count")
    text = httpx.get(f"{live_url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert "# TYPE gradstore_gradient_seconds histogram" in text.text


def test_not_ready_until_the_engine_is_loaded(demo_config):
    """Before lifespan has loaded the engine: liveness ok, readiness 503, API 503 with a message."""
    from fastapi.testclient import TestClient

    client = TestClient(create_app(RunConfig.load(demo_config)))  # not entered: lifespan has not run
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503 and client.get("/readyz").json() == {"status": "loading"}
    response = client.get("/v1/run")
    assert response.status_code == 503 and "loading" in _message(response)


# -- 3. auth, limits and bad input ------------------------------------------------------------------


def test_api_key_required_on_the_api_not_on_probes(secured_url):
    influence = {"queries": [{"test_index": 1}], "top_k": 2}
    for headers in (
        {},
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"X-API-Key": API_KEY[:-1]},
        {"X-API-Key": API_KEY + "x"},
    ):
        for method, path, body in (
            ("POST", "/v1/influence", influence),
            ("GET", "/v1/run", None),
            ("GET", "/v1/examples/0", None),
            ("POST", "/v1/self-influence", {"top_k": 2}),
        ):
            response = httpx.request(method, f"{secured_url}{path}", json=body, headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert "API key" in _message(response)
    for headers in (
        {"X-API-Key": API_KEY},
        {"Authorization": f"Bearer {API_KEY}"},
        {"authorization": f"bearer {API_KEY}"},
    ):
        assert httpx.post(f"{secured_url}/v1/influence", json=influence, headers=headers).status_code == 200, headers
        assert httpx.get(f"{secured_url}/v1/run", headers=headers).status_code == 200, headers
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{secured_url}{path}").status_code == 200, path


def test_sdk_sends_the_key_and_raises_the_servers_refusal(secured_url):
    with Client(secured_url, api_key=API_KEY) as client:
        assert len(client.influence([{"test_index": 1}], top_k=2).results[0].proponents) == 2
    for key in (None, "wrong"):
        with Client(secured_url, api_key=key) as client:
            with pytest.raises(GradstoreAPIError) as error:
                client.run()
            assert error.value.status_code == 401 and "API key" in error.value.message

    async def via_async(key):
        async with AsyncClient(secured_url, api_key=key) as client:
            return await client.influence([{"test_index": 1}], top_k=2)

    assert len(asyncio.run(via_async(API_KEY)).results) == 1
    with pytest.raises(GradstoreAPIError) as error:
        asyncio.run(via_async("wrong"))
    assert error.value.status_code == 401


SDK_REFUSALS = [
    # (call on a Client, status, words the GradstoreAPIError's message must contain)
    (lambda c: c.influence([{"test_index": 0}], top_k=21), 422, ["top_k=21", "limit of 20"]),
    (lambda c: c.influence([{"test_index": 0}], top_k=0), 422, ["body.top_k", "greater than or equal to 1"]),
    (lambda c: c.influence([{"test_index": i} for i in range(5)]), 422, ["5 queries", "limit is 4"]),
    (lambda c: c.influence([{"test_index": 0}], checkpoints=["epoch-9"]), 422, ["unknown checkpoints ['epoch-9']"]),
    (lambda c: c.influence([{"digit": 3}]), 422, ["query 0 rejected by DigitsTask", '"test_index"']),
    (lambda c: c.influence(vectors=np.zeros((1, 4, 3))), 422, ["vectors must have shape [B, 4,", "got [1, 4, 3]"]),
    (lambda c: c.influence([{"test_index": 0}], lr_weighting="cosine"), 422, ["body.lr_weighting"]),
    (lambda c: c.self_influence(top_k=21), 422, ["top_k=21"]),
    (lambda c: c.example(1500), 404, ["no training example with id 1500"]),
    (lambda c: c.influence([{"test_index": 0, "pad": "x" * LIMITS["max_body_bytes"]}]), 413, ["limit of 100000 bytes"]),
]


def test_sdk_raises_the_servers_message_for_bad_input(secured_url):
    with Client(secured_url, api_key=API_KEY) as client:
        for call, status, words in SDK_REFUSALS:
            with pytest.raises(GradstoreAPIError) as error:
                call(client)
            assert error.value.status_code == status, error.value
            for word in words:
                assert word in error.value.message, (word, error.value.message)
            assert str(error.value).startswith(f"HTTP {status}: ")
        with pytest.raises(ValueError, match="exactly one of `queries`"):
            client.influence()  # refused before sending

    async def via_async():
        async with AsyncClient(secured_url, api_key=API_KEY) as client:
            return await asyncio.gather(
                client.influence([{"test_index": -1}]), client.example(-5), return_exceptions=True
            )

    bad_index, bad_example = asyncio.run(via_async())
    assert (
        isinstance(bad_index, GradstoreAPIError) and bad_index.status_code == 422 and "test_index" in bad_index.message
    )
    assert isinstance(bad_example, GradstoreAPIError) and bad_example.status_code == 404


def test_api_key_from_the_environment(engine, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    client = TestClient(create_app(engine=engine))
    assert client.get("/v1/run").status_code == 401
    assert client.get("/v1/run", headers={"X-API-Key": "from-env"}).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_oversized_bodies_are_refused_over_http(secured_url):
    """413 by Content-Length, and for a chunked body (no Content-Length) once it passes the limit."""
    limit = LIMITS["max_body_bytes"]
    big = json.dumps({"queries": [{"test_index": 0, "padding": "x" * (limit + 10)}]}).encode()
    headers = {"X-API-Key": API_KEY, "content-type": "application/json"}
    response = httpx.post(f"{secured_url}/v1/influence", content=big, headers=headers)
    assert response.status_code == 413 and f"limit of {limit} bytes" in _message(response)

    def chunks(data: bytes, size: int = 8192):
        for lo in range(0, len(data), size):
            yield data[lo : lo + size]

    response = httpx.post(f"{secured_url}/v1/influence", content=chunks(big), headers=headers)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413 and f"limit of {limit} bytes" in _message(response)
    # a small chunked body is still read and answered
    small = json.dumps({"queries": [{"test_index": 0}], "top_k": 2}).encode()
    response = httpx.post(f"{secured_url}/v1/influence", content=chunks(small, 7), headers=headers)
    assert response.status_code == 200 and len(response.json()["results"][0]["proponents"]) == 2


BAD_REQUESTS = {
    # name: (method, path, JSON body, raw bytes, or a function of the store's dimension D giving the body,
    #        status, words the message must contain, with "D" standing for the dimension)
    "top_k above the limit": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "top_k": 21},
        422,
        ["top_k=21", "limit of 20"],
    ),
    "top_k zero": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "top_k": 0},
        422,
        ["top_k", "greater than or equal to 1"],
    ),
    "top_k not a number": ("POST", "/v1/influence", {"queries": [{"test_index": 0}], "top_k": "ten"}, 422, ["top_k"]),
    "too many queries": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": i} for i in range(5)]},
        422,
        ["5 queries", "limit is 4"],
    ),
    "unknown checkpoint": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "checkpoints": ["epoch-9"]},
        422,
        ["unknown checkpoints", "epoch-9"],
    ),
    "empty checkpoint list": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "checkpoints": []},
        422,
        ["checkpoints"],
    ),
    "payload the Task rejects": (
        "POST",
        "/v1/influence",
        {"queries": [{"image": "cat.png"}]},
        422,
        ["query 0", '"test_index"'],
    ),
    "test_index out of range": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}, {"test_index": 10**6}]},
        422,
        ["query 1", "test_index"],
    ),
    "pixels of the wrong length": (
        "POST",
        "/v1/influence",
        {"queries": [{"pixels": [0] * 10, "label": 1}]},
        422,
        ["pixels", "64"],
    ),
    "label out of range": ("POST", "/v1/influence", {"queries": [{"pixels": [0] * 64, "label": 12}]}, 422, ["label"]),
    "payload not an object": ("POST", "/v1/influence", {"queries": [3]}, 422, ["queries.0"]),
    "bad JSON": ("POST", "/v1/influence", b'{"queries": [{"test_index": 0}', 422, ["JSON decode error"]),
    "body not an object": ("POST", "/v1/influence", [1, 2], 422, ["body"]),
    "unknown field": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "topk": 3},
        422,
        ["topk", "not permitted"],
    ),
    "neither queries nor vectors": ("POST", "/v1/influence", {"top_k": 3}, 422, ["exactly one of `queries`"]),
    "both queries and vectors": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "vectors": [[[0.0]]]},
        422,
        ["exactly one"],
    ),
    "empty queries": ("POST", "/v1/influence", {"queries": []}, 422, ["must not be empty"]),
    "vectors of the wrong shape": (
        "POST",
        "/v1/influence",
        {"vectors": [[[0.5] * 3] * 4]},
        422,
        ["shape [B, 4, D]", "got [1, 4, 3]"],
    ),
    "vectors for the wrong checkpoints": (
        "POST",
        "/v1/influence",
        lambda d: {"vectors": [[[0.5] * d] * 4], "checkpoints": ["epoch-0"]},
        422,
        ["shape [B, 1, D]", "got [1, 4, D]"],
    ),
    "vectors ragged": ("POST", "/v1/influence", lambda d: {"vectors": [[[0.5] * d] * 3 + [[0.5]]]}, 422, ["vectors"]),
    "vectors not numbers": ("POST", "/v1/influence", {"vectors": [[["a"]]]}, 422, ["vectors"]),
    "vectors overflow float32": (
        "POST",
        "/v1/influence",
        lambda d: {"vectors": [[[1e300] * d] * 4]},
        422,
        ["NaN or Inf"],
    ),
    "unknown lr_weighting": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "lr_weighting": "cosine"},
        422,
        ["lr_weighting"],
    ),
    "unknown measurement": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "measurement": "accuracy"},
        422,
        ["measurement"],
    ),
    "normalize unlike the index": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0}], "normalize": True},
        422,
        ["normalize=False", "rebuild"],
    ),
    "self-influence top_k above the limit": (
        "POST",
        "/v1/self-influence",
        {"top_k": 500},
        422,
        ["top_k=500", "limit of 20"],
    ),
    "self-influence unknown checkpoint": (
        "POST",
        "/v1/self-influence",
        {"checkpoints": ["last"]},
        422,
        ["unknown checkpoints", "last"],
    ),
    "unknown example": ("GET", "/v1/examples/1500", None, 404, ["no training example with id 1500", "0..1499"]),
    "negative example id": ("GET", "/v1/examples/-1", None, 404, ["no training example with id -1"]),
    "example id not an integer": ("GET", "/v1/examples/seven", None, 422, ["example_id", "integer"]),
    "oversized body": (
        "POST",
        "/v1/influence",
        {"queries": [{"test_index": 0, "pad": "x" * 100_000}]},
        413,
        ["limit of 100000 bytes"],
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_4xx_with_a_clear_message(secured_client, engine, name):
    method, path, body, status, words = BAD_REQUESTS[name]
    dim = engine.store.dim
    body = body(dim) if callable(body) else body
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = secured_client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    message = _message(response)
    for word in words:
        word = word.replace(", D]", f", {dim}]")
        assert word in message, f"{word!r} not in {message!r}"


# -- one definition of requests, run metadata and error statuses --------------------------------------


def test_info_json_and_v1_run_serve_the_same_run_info(demo_config, capsys, monkeypatch):
    """``gradstore info --json`` and ``GET /v1/run`` of an app loading the same run.toml: the same RunInfo."""
    from fastapi.testclient import TestClient

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    info = _cli_json(capsys, ["info", "--config", str(demo_config), "--json"])
    with TestClient(create_app(RunConfig.load(demo_config))) as client:  # lifespan loads the engine
        served = client.get("/v1/run")
    assert served.status_code == 200 and served.json() == info
    run = RunInfo.model_validate(info)
    assert run.store_status is None and run.index.status == "ready" and run.index.reason is None
    names = ["epoch-0", "epoch-1", "epoch-2", "epoch-3"]
    assert [c.name for c in run.checkpoints] == run.index.checkpoints == names
    assert [(c.lr, c.step, c.rows, c.adam) for c in run.checkpoints] == [
        (0.2, 47, 1500, False),  # step: the optimizer step each epoch ends at (47 batches of 32 per epoch)
        (0.1, 94, 1500, False),
        (0.05, 141, 1500, False),
        (0.025, 188, 1500, False),
    ]
    index = run.index
    assert (index.rows, index.kind, index.preconditioner, index.normalize) == (1500, "flat", "identity", False)
    assert run.projection.dim == run.dim == sum(layer.k_in * layer.k_out for layer in run.projection.layers)
    layers = [(la.name, la.kind, la.k_in, la.k_out) for la in run.projection.layers]
    assert layers == [("0", "linear", 16, 16), ("2", "linear", 16, 10)]
    assert (run.residency, run.dtype, run.projection.init, run.projection.seed) == ("all", "float16", "gaussian", 0)
    # the demo captures during training with per-example losses: its first batch was checked against autograd
    (check,) = {c.verification.model_dump_json() for c in run.checkpoints}  # once per logger, recorded for each
    verification = run.checkpoints[0].verification
    assert verification.passed and (verification.mode, verification.path) == ("per-example", "capture()")
    assert verification.max_error < 1e-5 and run.coverage.fraction == 1.0 and run.coverage.skipped == []


def test_openapi_names_the_response_models_and_the_version(secured_client):
    from importlib.metadata import version

    spec = secured_client.get("/openapi.json").json()
    assert spec["info"]["version"] == version("gradstore")

    def ok_schema(path: str) -> str:
        return spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert ok_schema("/v1/run") == "#/components/schemas/RunInfo"
    assert ok_schema("/v1/examples/{example_id}") == "#/components/schemas/ExampleResponse"
    fields = spec["components"]["schemas"]["InfluenceRequest"]["properties"]
    defaults = {name: fields[name].get("default") for name in ("top_k", "lr_weighting", "measurement")}
    assert defaults == {"top_k": 10, "lr_weighting": None, "measurement": "loss"}  # None: the index's weighting
    assert spec["components"]["schemas"]["SelfInfluenceRequest"]["properties"]["top_k"]["default"] == 20


def _recorder(sent: list, answer: dict) -> httpx.MockTransport:
    """A transport that records ``(method, path, JSON body)`` and answers ``answer``."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.method, request.url.path, json.loads(request.content) if request.content else None))
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handler)


INFLUENCE_ANSWER = {
    "results": [],
    "checkpoints": ["c"],
    "weights": {"c": 1.0},
    "lr_weighting": "schedule",
    "measurement": "loss",
}
SELF_ANSWER = {"results": [], "checkpoints": ["c"], "weights": {"c": 1.0}, "lr_weighting": "uniform"}
FAKE_URL = "http://gradstore.test"


def test_sdk_sends_the_request_models_dump():
    """The SDK's bodies are ``model_dump(exclude_none=True, mode="json")`` of the server's request models."""
    from gradstore.server.run.schemas import InfluenceRequest, SelfInfluenceRequest

    sent: list = []
    dump = dict(exclude_none=True, mode="json")
    payloads = [{"test_index": 3, "note": None}]
    vectors = np.arange(6, dtype=np.float32).reshape(1, 2, 3) / 4
    options = dict(checkpoints=["b", "a"], lr_weighting="normalized", normalize=False)
    with Client(FAKE_URL, transport=_recorder(sent, INFLUENCE_ANSWER)) as client:
        client.influence(payloads, top_k=4)
        client.influence(vectors=vectors, **options)
    assert sent == [
        ("POST", "/v1/influence", InfluenceRequest(queries=payloads, top_k=4).model_dump(**dump)),
        ("POST", "/v1/influence", InfluenceRequest(vectors=vectors.tolist(), **options).model_dump(**dump)),
    ]
    assert sent[0][2] == {"queries": payloads, "top_k": 4, "measurement": "loss"}
    assert sent[1][2]["vectors"] == [[[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]] and sent[1][2]["normalize"] is False

    async def via_async():
        async with AsyncClient(FAKE_URL, transport=_recorder(sent, SELF_ANSWER)) as client:
            return await client.self_influence(lr_weighting="uniform", checkpoints=["c"])

    sent.clear()
    assert asyncio.run(via_async()).lr_weighting == "uniform"
    expected = SelfInfluenceRequest(lr_weighting="uniform", checkpoints=["c"]).model_dump(**dump)
    assert sent == [("POST", "/v1/self-influence", expected)]
    assert expected == {"top_k": 20, "lr_weighting": "uniform", "checkpoints": ["c"]}


def test_sdk_refuses_what_the_request_model_refuses_without_sending():
    from pydantic import ValidationError

    from gradstore.server.client import InvalidRequestError

    sent: list = []
    with Client(FAKE_URL, transport=_recorder(sent, INFLUENCE_ANSWER)) as client:
        for call, message in [
            (
                lambda: client.influence([{"test_index": 0}], top_k=0),
                "body.top_k: Input should be greater than or equal to 1",
            ),
            (
                lambda: client.influence([{"test_index": 0}], lr_weighting="cosine"),
                "body.lr_weighting: Input should be 'schedule', 'uniform' or 'normalized'",
            ),
            (lambda: client.influence([]), "body: `queries` (or `vectors`) must not be empty"),
            (
                lambda: client.influence([{"test_index": 0}], vectors=[[[0.0]]]),
                "body: give exactly one of `queries` (payloads) or `vectors` (precomputed gradients)",
            ),
            (lambda: client.influence([{"test_index": 0}], topk=3), "body.topk: Extra inputs are not permitted"),
            (lambda: client.self_influence(top_k=-2), "body.top_k: Input should be greater than or equal to 1"),
        ]:
            with pytest.raises(InvalidRequestError) as error:
                call()
            refused = error.value
            assert (refused.status_code, refused.message, str(refused)) == (422, message, f"HTTP 422: {message}")
            assert isinstance(refused, GradstoreAPIError) and isinstance(refused, ValueError)
            assert isinstance(refused.__cause__, ValidationError) and refused.errors
    assert sent == []

    async def via_async():
        async with AsyncClient(FAKE_URL, transport=_recorder(sent, {})) as client:
            await client.influence(vectors=np.zeros((1, 1, 2)), top_k=0)

    with pytest.raises(InvalidRequestError, match=r"body\.top_k"):
        asyncio.run(via_async())
    assert sent == []


def test_error_statuses_come_from_one_table(engine, monkeypatch):
    """Client mistakes are 4xx, a run the server cannot serve a 503, anything else a 500; each with its message."""
    from fastapi.testclient import TestClient

    from gradstore.logger import TaskError
    from gradstore.server.errors import HTTP_STATUS, ConfigError, QueryError, http_status
    from gradstore.store import CheckpointNotFoundError, IndexNotFoundError, StaleIndexError, UnknownExampleError

    assert [http_status(e("x")) for e in (QueryError, CheckpointNotFoundError, UnknownExampleError)] == [422, 422, 404]
    assert [http_status(e("x")) for e in (StaleIndexError, IndexNotFoundError, ConfigError)] == [503, 503, 503]
    assert http_status(TaskError("x")) == 500 and http_status(RuntimeError("x")) == 500
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    client = TestClient(create_app(engine=engine), raise_server_exceptions=False)
    for error, status in [
        (StaleIndexError("the store changed after index build; run `gradstore index`"), 503),
        (UnknownExampleError("no training example with id 5"), 404),
        (TaskError("describe() returned a list"), 500),
    ]:

        def describe(example_id, error=error):
            raise error

        monkeypatch.setattr(engine, "describe", describe)
        response = client.get("/v1/examples/5")
        assert (response.status_code, response.json()) == (status, {"detail": str(error)})


def test_package_exports_its_public_api_without_fastapi():
    code = (
        "import sys, gradstore.server as s; assert 'fastapi' not in sys.modules, 'fastapi imported'; "
        "assert all(hasattr(s, name) for name in s.__all__); print(' '.join(s.__all__))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert {"Client", "AsyncClient", "QueryEngine", "RunConfig", "RunInfo", "InfluenceRequest"} <= set(names)
    assert "create_app" not in names and len(names) == len(set(names))


# -- 4. concurrency ---------------------------------------------------------------------------------


def test_concurrent_clients_get_the_sequential_answers(live_url, engine, queries):
    """32 clients hammer the server for a bounded time; every answer equals the sequential one."""
    weights = engine.checkpoint_weights(None, "schedule")
    raw = engine.query_gradients(engine.examples_from_payloads(queries[:1]), weights)
    requests = [("/v1/influence", {"queries": [{"test_index": i}], "top_k": 5}) for i in range(6)] + [
        ("/v1/influence", {"queries": queries, "top_k": 4, "lr_weighting": "uniform"}),
        (
            "/v1/influence",
            {"queries": [queries[2]], "top_k": 8, "checkpoints": ["epoch-3", "epoch-0"], "measurement": "measurement"},
        ),
        ("/v1/influence", {"vectors": raw.tolist(), "top_k": 5}),
        ("/v1/influence", {"queries": [{"test_index": 10**6}]}),  # a 422 is an answer too
        ("/v1/self-influence", {"top_k": 10, "lr_weighting": "normalized"}),
        ("/v1/examples/17", None),
        ("/v1/run", None),
    ]

    def call(http: httpx.Client, path: str, body) -> tuple[int, dict]:
        response = http.post(path, json=body) if body is not None else http.get(path)
        return response.status_code, _answer(response.json())

    with httpx.Client(base_url=live_url, timeout=60) as http:
        sequential = [call(http, path, body) for path, body in requests]
    assert [status for status, _ in sequential] == [200] * 9 + [422] + [200] * 3

    answered = [0] * CONCURRENT_CLIENTS
    failures: list[str] = []
    start = threading.Barrier(CONCURRENT_CLIENTS)
    deadline = time.monotonic() + CONCURRENT_SECONDS + 30  # replaced once every client is connected

    def client(n: int) -> None:
        nonlocal deadline
        try:
            with httpx.Client(base_url=live_url, timeout=60) as http:
                if start.wait() == 0:
                    deadline = time.monotonic() + CONCURRENT_SECONDS
                i = n  # each client walks the requests from its own starting point
                while time.monotonic() < deadline or answered[n] == 0:
                    path, body = requests[i % len(requests)]
                    got = call(http, path, body)
                    expected = sequential[i % len(requests)]
                    assert got[0] == expected[0], f"{path} {body}: status {got[0]} != {expected[0]}"
                    # same examples, order and descriptions; scores equal up to float32 rounding,
                    # in case concurrent queries are micro-batched
                    _assert_same(got[1], expected[1], rel=1e-5, where=f"{path} {json.dumps(body)[:80]}")
                    answered[n] += 1
                    i += 1
        except BaseException as exc:
            failures.append(f"client {n}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CONCURRENT_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CONCURRENT_SECONDS + 120)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert not failures, "\n".join(failures[:5])
    assert all(count >= 1 for count in answered), answered
    assert sum(answered) >= 2 * CONCURRENT_CLIENTS, answered
