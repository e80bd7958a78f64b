"""Batch scoring on Ray Data (issue 19 part 5, ``--ray``): on the real engine (a session-scoped
``ray.init(num_cpus=2)``), the files equal the local path's bit for bit under random (also negative) checkpoint
weights, over an index's shards or equal row ranges, resumable; ``gradstore score --ray`` equals ``gradstore score``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gradstore.store.batch_scoring import read_batch, score_batch
from tests.test_batch_scoring import M, N, _setup

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gradstore[ray]')")

from gradstore.store.ray_scoring import row_ranges, score_batch_ray  # noqa: E402

K = 5


@pytest.fixture(scope="session")
def ray_session():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _index(tmp_path, shards):
    """test_batch_scoring's index (600 rows, 3 checkpoints, float16), with random (also negative) weights."""
    index, raw, _ = _setup(tmp_path, shards=shards)
    rng = np.random.default_rng(11)
    weights = rng.standard_normal(3)
    weights[rng.integers(3)] = 0.0  # and a dropped checkpoint
    return index, index.prepare(raw, weights)


@pytest.mark.parametrize(("shards", "parts"), [(3, None), (1, 4)], ids=["three-shards", "unsharded-four-ranges"])
def test_ray_scoring_equals_local_bit_for_bit(ray_session, tmp_path, shards, parts):
    index, prepared = _index(tmp_path, shards)
    common = {"block_queries": 8, "chunk_rows": 64, "output_format": "jsonl", "progress": False}
    score_batch(index, prepared, tmp_path / "local", K, **common)
    summary = score_batch_ray(index, prepared, tmp_path / "ray", K, parts=parts, **common)
    assert (summary.blocks_written, summary.queries, summary.rows) == (5, M, N)
    assert len(row_ranges(index, 64, parts)) == (3 if shards == 3 else 4)
    assert read_batch(tmp_path / "ray") == read_batch(tmp_path / "local")  # ids, scores, contributions, aggregates
    for name in ("part-000000.jsonl", "part-000002.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_ray_scoring_resumes(ray_session, tmp_path):
    index, prepared = _index(tmp_path, 2)
    common = {"block_queries": 10, "chunk_rows": 100, "output_format": "jsonl", "progress": False}
    score_batch_ray(index, prepared, tmp_path / "out", K, **common)
    before = read_batch(tmp_path / "out")
    (tmp_path / "out" / "part-000001.jsonl").unlink()
    again = score_batch_ray(index, prepared, tmp_path / "out", K, **common)
    assert (again.blocks_written, again.blocks_skipped) == (1, 3)
    assert read_batch(tmp_path / "out") == before
    done = score_batch_ray(index, prepared, tmp_path / "out", K, **common)
    assert (done.blocks_written, done.blocks_skipped) == (0, 4)


def test_score_command_on_ray_equals_local(ray_session, tmp_path, capsys):
    from tests.test_cli import run_cli, save_checkpoints, write_config

    save_checkpoints(tmp_path)
    config = write_config(tmp_path, index='kind = "flat"\nshards = 2')
    run_cli(capsys, "index", "--config", config, "--quiet")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"test_index": i}) for i in range(9)))
    argv = ["score", "--config", config, "--queries", queries, "--quiet", "--block-queries", 4, "--format", "jsonl"]
    local = json.loads(run_cli(capsys, *argv, "--output", tmp_path / "local", "--json"))
    on_ray = run_cli(capsys, *argv, "--output", tmp_path / "ray", "--ray")
    assert "on Ray" in on_ray and "scored 9 queries x 200 rows" in on_ray
    assert local["blocks_written"] == 3
    assert read_batch(tmp_path / "ray") == read_batch(tmp_path / "local")
