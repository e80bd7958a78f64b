"""Sharded indexes (issue 19 part 3): row ranges, each a complete index of its kind, merged exactly at query time.
The local mode (one process, every shard) gives the unsharded index's ids and scores bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradstore.store import GradientIndex, IndexOptions
from gradstore.store.manifest import IndexManifest
from gradstore.store.shards import ShardedBackend, shard_ranges
from tests.helpers.search import synthetic_spec, write_store

N = 700


def _store(tmp_path, dtype="float32"):
    rng = np.random.default_rng(2)
    spec = synthetic_spec([("w", 9, 4)])
    rows = {f"c{i}": (0.1 / (i + 1), rng.standard_normal((N, spec.dim)).astype(dtype)) for i in range(3)}
    return write_store(tmp_path / "run.zarr", spec, rows, dtype=dtype, chunk_rows=128), spec


def _same(a, b):
    for name in ("proponent_rows", "proponent_scores", "proponent_contributions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("opponent_rows", "opponent_scores", "opponent_contributions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_shard_ranges_cover_the_rows():
    assert shard_ranges(10, 3) == [[0, 3], [3, 7], [7, 10]]
    assert shard_ranges(2, 5) == [[0, 1], [1, 2]]
    assert shard_ranges(7, 1) == [[0, 7]]


@pytest.mark.parametrize(
    ("kind", "dtype", "extra"),
    [
        ("flat", "float16", {}),
        ("flat", "float32", {"normalize": True, "preconditioner": "kfac"}),
        ("ivf", "float32", {"nlist": 4, "nprobe": 4}),  # every list probed: its candidates hold the exact top k
        ("hnsw", "float32", {"rerank": 100}),  # k * rerank >= a shard's rows: every row is a candidate
        ("ivfsq", "float32", {"nlist": 4, "nprobe": 4, "rerank": 100}),
    ],
)
def test_sharded_search_equals_unsharded_bit_for_bit(tmp_path, kind, dtype, extra):
    store, spec = _store(tmp_path, dtype)
    rng = np.random.default_rng(7)
    whole = GradientIndex.build(store, IndexOptions(kind=kind, **extra), tmp_path / "whole.index", progress=False)
    sharded = GradientIndex.build(
        store, IndexOptions(kind=kind, shards=3, **extra), tmp_path / "sharded.index", progress=False
    )
    assert isinstance(sharded.backend, ShardedBackend) and len(sharded.backend.shards) == 3
    manifest = json.loads((tmp_path / "sharded.index" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == shard_ranges(N, 3)
    assert manifest["options"]["shards"] == 3
    if kind != "flat":  # each shard a complete FAISS index in its own folder, recorded in the manifest
        assert {f"shards/0000{s}/faiss.index" for s in range(3)} <= set(manifest["files"])
    np.testing.assert_array_equal(sharded.ids, whole.ids)
    np.testing.assert_array_equal(sharded.sqnorms, whole.sqnorms)
    for _ in range(3):  # random checkpoint weights, negative ones and a dropped checkpoint among them
        weights = rng.normal(size=3)
        weights[rng.integers(3)] = 0.0 if rng.random() < 0.5 else -abs(weights[0])
        raw = rng.standard_normal((4, 3, spec.dim)).astype(np.float32)
        _same(sharded.search(raw, weights, 10), whole.search(raw, weights, 10))
    # reopened from disk, searched again
    again = GradientIndex.open(tmp_path / "sharded.index", store)
    raw = rng.standard_normal((2, 3, spec.dim)).astype(np.float32)
    _same(again.search(raw, [0.3, -0.2, 0.1], 5), whole.search(raw, [0.3, -0.2, 0.1], 5))
    if kind == "flat":
        got, want = again.search(raw, [1, 1, 1], 5), whole.search(raw, [1, 1, 1], 5)
        np.testing.assert_allclose(got.mean_abs_score, want.mean_abs_score, rtol=1e-6)
        np.testing.assert_array_equal(got.max_abs_score, want.max_abs_score)


def test_an_update_of_a_sharded_index_keeps_its_shards_and_an_unsharded_one_still_opens(tmp_path):
    store, spec = _store(tmp_path)
    GradientIndex.build(store, IndexOptions(kind="flat"), tmp_path / "old.index", progress=False)
    # an index written before shards existed: no "shards" in its options or manifest
    path = tmp_path / "old.index" / "manifest.json"
    data = json.loads(path.read_text())
    del data["shards"], data["options"]["shards"]
    path.write_text(json.dumps(data))
    old = GradientIndex.open(tmp_path / "old.index", store)
    assert old.options.shards == 1 and IndexManifest.read(tmp_path / "old.index").shards == []
    sharded = GradientIndex.build(store, IndexOptions(kind="ivf", shards=2, nlist=2), tmp_path / "s.index")
    updated = GradientIndex.update(tmp_path / "s.index", store)
    changes = updated.changes
    assert changes is not None and changes.rebuilt is None  # nothing new: every shard kept (tests/test_shards_update)
    assert (changes.shards, changes.shards_reused, changes.parts_written, changes.faiss) == (2, 2, 0, "unchanged")
    assert isinstance(updated.backend, ShardedBackend) and len(updated.backend.shards) == 2
    raw = np.random.default_rng(0).standard_normal((1, 3, spec.dim)).astype(np.float32)
    _same(updated.search(raw, [1, 1, 1], 3), sharded.search(raw, [1, 1, 1], 3))
