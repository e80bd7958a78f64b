"""Serving on Ray Serve (issue 19 part 4, ``gradstore serve --ray``): on the real engine (``ray.init(num_cpus=2)``),
a 2-shard index searched by one Serve deployment per shard answers exactly as the local engine (ids and scores,
bit for bit, also under random negative checkpoint weights); ``/readyz`` lists every shard; a killed shard replica
gives a retried correct answer or a 503 naming the shard, and answers again once Serve restarted it.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gradstore[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'gradstore[ray]')")

from fastapi.testclient import TestClient  # noqa: E402

from gradstore.server import cli  # noqa: E402
from gradstore.server.errors import http_status  # noqa: E402
from gradstore.server.http.app import create_app  # noqa: E402
from gradstore.server.run.config import RunConfig  # noqa: E402
from gradstore.server.run.ray_backend import (  # noqa: E402
    APP_PREFIX,
    GRADIENTS_APP,
    GradientHandle,
    RayShardedBackend,
    RayShards,
    ShardHandle,
    ShardUnavailableError,
    deploy_gradients,
    deploy_shards,
    weights_digest,
)
from gradstore.server.run.run import Run  # noqa: E402
from tests.test_cli import save_checkpoints, write_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

QUERIES = {"queries": [{"test_index": i} for i in range(5)], "top_k": 6}


def _stripped(value):
    """An answer without its timings."""
    if isinstance(value, dict):
        return {k: _stripped(v) for k, v in value.items() if k not in ("took_ms", "timings_ms")}
    if isinstance(value, list):
        return [_stripped(v) for v in value]
    return value


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """A 2-shard flat run served with ``engine = "ray"`` (its config)."""
    tmp = tmp_path_factory.mktemp("ray-serve")
    save_checkpoints(tmp)
    path = write_config(tmp, index='kind = "flat"\nshards = 2')
    path.write_text(path.read_text() + '\n[server]\nengine = "ray"\nray_shard_cpus = 0.25\nray_gradient_cpus = 0.25\n')
    cli.main(["index", "--config", str(path), "--quiet"])
    return RunConfig.load(path)


@pytest.fixture(scope="module")
def served(ray_run):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = ray_run
    local = Run(config).open_engine()
    remote = Run(config).open_engine(loader=RayShards(deploy_shards(config), timeout_s=10.0))
    with TestClient(create_app(engine=local)) as a, TestClient(create_app(engine=remote)) as b:
        yield local, remote, a, b
    serve.shutdown()
    if started:
        ray.shutdown()


def test_ray_shards_answer_as_the_local_engine_bit_for_bit(served):
    local, remote, local_client, ray_client = served
    assert isinstance(remote.index.backend, RayShardedBackend) and len(remote.index.backend.shards) == 2
    expected = local_client.post("/v1/influence", json=QUERIES)
    got = ray_client.post("/v1/influence", json=QUERIES)
    assert expected.status_code == got.status_code == 200
    assert _stripped(got.json()) == _stripped(expected.json())
    # the index's own search, random (also negative) weights: every array equal
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((4, len(local.index.checkpoints), local.index.dim)).astype(np.float32)
    weights = np.array([0.7, -1.3])
    a, b = local.index.search(raw, weights, 7), remote.index.search(raw, weights, 7)
    for field in ("proponent_rows", "proponent_scores", "opponent_rows", "opponent_scores", "proponent_contributions"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    ready = ray_client.get("/readyz")
    assert ready.status_code == 200
    assert [(s["shard"], s["status"]) for s in ready.json()["shards"]] == [(0, "ready"), (1, "ready")]


def test_a_killed_shard_replica_is_retried_or_named_and_comes_back(served):
    _, _, local_client, ray_client = served
    expected = _stripped(local_client.post("/v1/influence", json=QUERIES).json())
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_PREFIX}1#")
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    answer = ray_client.post("/v1/influence", json=QUERIES)
    if answer.status_code == 200:  # the retry reached a live replica: the whole answer, correct
        assert _stripped(answer.json()) == expected
    else:  # never a partial answer: a 503 naming the shard
        assert answer.status_code == 503, answer.text
        assert "index shard 1 " in answer.json()["detail"]
    deadline = time.monotonic() + 60
    while True:  # Serve starts a new replica; readiness and answers come back
        ready = ray_client.get("/readyz")
        if ready.status_code == 200:
            break
        assert ready.status_code == 503 and "index shard 1 " in ready.json()["reason"]
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.5)
    again = ray_client.post("/v1/influence", json=QUERIES)
    assert again.status_code == 200 and _stripped(again.json()) == expected


class _Failing:
    """A deployment handle whose every call fails."""

    def __init__(self):
        self.calls = 0
        self.candidates = self

    def remote(self, *args):
        self.calls += 1
        return self

    def result(self, timeout_s=None):
        raise TimeoutError(f"no answer within {timeout_s} s")


def test_a_shard_that_does_not_answer_is_retried_once_then_a_503_naming_it():
    handle = _Failing()
    shard = ShardHandle(handle, 3, (100, 150), "digest", timeout_s=0.5)
    with pytest.raises(ShardUnavailableError, match=r"index shard 3 \(rows 100\.\.149") as info:
        shard.candidates(np.zeros((1, 2, 4), dtype=np.float32), 5)
    assert handle.calls == 2 and http_status(info.value) == 503


def test_query_gradients_on_a_replica_answer_as_the_local_engine(ray_run, served):
    """``[server] ray_gradients = "replica"``: query gradients come from the gradient deployment (on CPU here: this
    cluster has no GPU), the answers are the local engine's (ids; scores to float32 rounding of the gradients);
    ``/readyz`` lists the replica. ``auto`` on a cluster without a GPU keeps them in the front door (and removes a
    replica left running)."""
    local, _, local_client, _ = served
    config = ray_run
    replica = config.model_copy(update={"server": config.server.model_copy(update={"ray_gradients": "replica"})})
    engine = Run(replica).open_serving_engine()
    assert isinstance(engine.gradient_service, GradientHandle)
    assert engine.gradient_service.status(10.0) == {"app": GRADIENTS_APP, "status": "ready", "device": "cpu"}
    with TestClient(create_app(engine=engine)) as client:
        got = client.post("/v1/influence", json=QUERIES)
        assert got.status_code == 200
        expected = local_client.post("/v1/influence", json=QUERIES).json()
        for mine, theirs in zip(got.json()["results"], expected["results"], strict=True):
            for role in ("proponents", "opponents"):
                assert [r["id"] for r in mine[role]] == [r["id"] for r in theirs[role]]
                np.testing.assert_allclose([r["score"] for r in mine[role]], [r["score"] for r in theirs[role]], 1e-5)
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["gradients"]["status"] == "ready"
    examples = local.examples_from_payloads(QUERIES["queries"])
    weights = np.ones(len(local.checkpoints))
    # the same code on the same device; the replica's one torch thread may round the last bits differently
    np.testing.assert_allclose(
        engine.query_gradients(examples, weights), local.query_gradients(examples, weights), rtol=1e-5, atol=1e-6
    )
    auto = config.model_copy(update={"server": config.server.model_copy(update={"ray_gradients": "auto"})})
    assert deploy_gradients(auto, weights_digest(local)) is None  # no GPU in this cluster: gradients stay here
    assert GRADIENTS_APP not in serve.status().applications
