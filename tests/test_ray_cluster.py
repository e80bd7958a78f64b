"""Placement on a real 2-node Ray cluster (issue 19 part 7): ``ray.cluster_utils.Cluster`` starts a head node and a
worker node on this machine (1 CPU each, their own raylets and object stores), and

* the shard deployments of ``gradstore serve --ray`` (1 CPU each, so one per node) run on both nodes and answer as
  the local engine, bit for bit (ids, exact scores, contributions), also under random negative checkpoint weights
  (each query's mean / max ``|score|`` over all rows, aggregates of the float32 scan, to a relative 1e-6);
* ``score_batch_ray``'s scans run in worker processes on both nodes and its files equal ``score_batch``'s byte for
  byte.

Where things ran is each replica's Ray node id (``ShardSearch.describe``) and, for batch scoring, the node id each
worker process records as it opens the index (the ``opener``). The cluster is a Ray session of its own: a session
the other Ray tests started (``ray.init(num_cpus=2)``) is shut down first and started again afterwards, so they pass
in any order.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gradstore[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'gradstore[ray]')")

from fastapi.testclient import TestClient  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from gradstore.server import cli  # noqa: E402
from gradstore.server.http.app import create_app  # noqa: E402
from gradstore.server.run.config import RunConfig  # noqa: E402
from gradstore.server.run.ray_backend import RayShards, deploy_shards  # noqa: E402
from gradstore.server.run.run import Run  # noqa: E402
from gradstore.store.batch_scoring import read_batch, score_batch  # noqa: E402
from gradstore.store.ray_scoring import _open_index, score_batch_ray  # noqa: E402
from tests.test_cli import save_checkpoints, write_config  # noqa: E402
from tests.test_ray_scoring import K, _index  # noqa: E402
from tests.test_ray_serve import QUERIES, _stripped  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]


def _split(answer: dict) -> tuple[dict, list[float]]:
    """An influence answer without timings, and apart from it each query's mean / max ``|score|``: aggregates of the
    float32 scan of every row, not of the exact float64 re-score, whose last bits depend on how the scan's matrix
    products were blocked (the process's BLAS), so they are compared to a relative 1e-6."""
    stripped = _stripped(answer)
    stats = [[r.pop(key) for key in ("mean_abs_score", "max_abs_score")] for r in stripped["results"]]
    return stripped, [float(v) for pair in stats for v in pair]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, 1 CPU each; the driver connected to them. Yields their node ids."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    before = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else None
    if before is not None:  # another module's session: ours needs a session of its own
        serve.shutdown()
        ray.shutdown()
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "resources": {"node_a": 1}}
    )
    try:
        nodes.add_node(num_cpus=1, resources={"node_b": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(alive) == 2, ray.nodes()
        yield alive
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()
        if before is not None:  # as the other Ray tests' session fixtures started it
            ray.init(num_cpus=before, include_dashboard=False, log_to_driver=False)


def test_shard_deployments_run_on_both_nodes_and_answer_as_the_local_engine(cluster, tmp_path):
    save_checkpoints(tmp_path)
    path = write_config(tmp_path, index='kind = "flat"\nshards = 2')
    # a whole node's CPU per shard: Serve can place the two shards only on different nodes
    path.write_text(path.read_text() + '\n[server]\nengine = "ray"\nray_shard_cpus = 1\n')
    cli.main(["index", "--config", str(path), "--quiet"])
    config = RunConfig.load(path)
    local = Run(config).open_engine()
    try:
        handles = deploy_shards(config)
        where = [h.describe.remote().result(timeout_s=30) for h in handles]
        assert [w["shard"] for w in where] == [0, 1]
        assert sorted(w["node"] for w in where) == cluster, where  # one shard on each node
        remote = Run(config).open_engine(loader=RayShards(handles, timeout_s=30.0))
        with TestClient(create_app(engine=local)) as a, TestClient(create_app(engine=remote)) as b:
            expected, got = a.post("/v1/influence", json=QUERIES), b.post("/v1/influence", json=QUERIES)
            assert expected.status_code == got.status_code == 200, got.text
            (want, want_stats), (have, have_stats) = _split(expected.json()), _split(got.json())
            assert have == want  # ids, exact scores and contributions, examples: bit for bit
            np.testing.assert_allclose(have_stats, want_stats, rtol=1e-6, atol=0)
            ready = b.get("/readyz")
            assert ready.status_code == 200 and [s["status"] for s in ready.json()["shards"]] == ["ready"] * 2
        rng = np.random.default_rng(7)
        raw = rng.standard_normal((4, len(local.index.checkpoints), local.index.dim)).astype(np.float32)
        weights = np.array([-0.4, 1.9])
        x, y = local.index.search(raw, weights, 7), remote.index.search(raw, weights, 7)
        for field in ("proponent_rows", "proponent_scores", "opponent_rows", "opponent_scores"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
        np.testing.assert_array_equal(x.proponent_contributions, y.proponent_contributions)
    finally:
        serve.shutdown()  # frees both nodes' CPUs for the next test


def _opened_on(record: Path, index_path: Path, store_path: Path):
    """The batch scorer's opener, which first notes the Ray node of the worker process opening the index."""
    record.mkdir(exist_ok=True)
    (record / f"{os.getpid()}-{ray.get_runtime_context().get_node_id()}").touch()
    return _open_index(index_path, store_path)


def test_batch_scoring_scans_on_both_nodes_and_equals_local_bit_for_bit(cluster, tmp_path):
    index, prepared = _index(tmp_path, 2)
    common = {"block_queries": 8, "chunk_rows": 64, "output_format": "jsonl", "progress": False}
    score_batch(index, prepared, tmp_path / "local", K, **common)
    opener = partial(_opened_on, tmp_path / "opened", index.path, index.store.path)
    summary = score_batch_ray(index, prepared, tmp_path / "ray", K, opener=opener, workers=2, **common)
    assert summary.blocks_written == 5
    nodes = {name.name.split("-", 1)[1] for name in (tmp_path / "opened").iterdir()}
    assert sorted(nodes) == cluster  # scans ran in worker processes on both nodes
    assert read_batch(tmp_path / "ray") == read_batch(tmp_path / "local")
    files = sorted(p.name for p in (tmp_path / "local").glob("part-*"))
    assert files == sorted(p.name for p in (tmp_path / "ray").glob("part-*")) and len(files) == 5
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
