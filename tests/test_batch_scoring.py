"""Batch scoring (issue 19 part 5, local path): many queries against every row, exact, streamed, resumable; checked
against a numpy brute force under random (also negative) checkpoint weights."""

from __future__ import annotations

import numpy as np
import pytest

from gradstore.store import GradientIndex, IndexOptions
from gradstore.store.batch_scoring import read_batch, score_batch
from gradstore.store.errors import IndexOptionsError
from tests.helpers.search import synthetic_spec, write_store

N, M, K = 600, 37, 6


def _setup(tmp_path, kind="flat", shards=1, dtype="float16"):
    rng = np.random.default_rng(4)
    spec = synthetic_spec([("w", 9, 4)])
    rows = {f"c{i}": (0.1, rng.standard_normal((N, spec.dim)).astype(dtype)) for i in range(3)}
    store = write_store(tmp_path / "run.zarr", spec, rows, dtype=dtype, chunk_rows=128)
    options = IndexOptions(kind=kind, shards=shards, nlist=4, nprobe=4, rerank=100)
    index = GradientIndex.build(store, options, tmp_path / "run.index", progress=False)
    raw = rng.standard_normal((M, 3, spec.dim)).astype(np.float32)
    weights = np.array([0.7, -1.3, 0.0])  # a negative weight and a dropped checkpoint
    return index, raw, weights


def _brute_force(index, prepared):
    vectors = index.exact_vectors(np.arange(index.num_rows)).astype(np.float64)
    return prepared.concatenated().astype(np.float64) @ vectors.T  # [M, N]


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_batch_scoring_equals_a_brute_force_and_the_search(tmp_path, output_format):
    index, raw, weights = _setup(tmp_path)
    prepared = index.prepare(raw, weights)
    summary = score_batch(
        index,
        prepared,
        tmp_path / "out",
        K,
        block_queries=8,
        chunk_rows=50,
        workers=2,
        output_format=output_format,
        progress=False,
    )
    assert summary.blocks_written == 5 and summary.blocks_skipped == 0 and summary.queries_scored == M
    records = read_batch(tmp_path / "out")
    assert [r["query"] for r in records] == list(range(M))
    exact = _brute_force(index, prepared)
    found = index.search(raw, weights, K)
    for q, record in enumerate(records):
        top = np.lexsort((index.ids, -exact[q]))[:K]
        bottom = np.lexsort((index.ids, exact[q]))[:K]
        assert record["proponent_ids"] == index.ids[top].tolist()
        assert record["opponent_ids"] == index.ids[bottom].tolist()
        np.testing.assert_allclose(record["proponent_scores"], exact[q, top], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(record["opponent_scores"], exact[q, bottom], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.sum(record["proponent_contributions"], 1), record["proponent_scores"])
        assert np.asarray(record["proponent_contributions"])[:, 2].tolist() == [0.0] * K  # weight 0
        # the mean sums float32 scores (relative error about C D 2^-24, as the search's); the max is exact
        np.testing.assert_allclose(record["mean_abs_score"], np.abs(exact[q]).mean(), rtol=1e-6)
        np.testing.assert_allclose(record["max_abs_score"], np.abs(exact[q]).max(), rtol=1e-12)
        # the search's answer, bit for bit
        assert record["proponent_ids"] == index.ids[found.proponent_rows[q]].tolist()
        assert record["proponent_scores"] == found.proponent_scores[q].tolist()
        assert record["opponent_scores"] == found.opponent_scores[q].tolist()


def test_batch_scoring_resumes_and_refuses_other_queries(tmp_path):
    index, raw, weights = _setup(tmp_path, kind="ivf", shards=2, dtype="float32")
    prepared = index.prepare(raw, weights)
    out = tmp_path / "out"
    first = score_batch(index, prepared, out, K, block_queries=10, progress=False, output_format="jsonl")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / "part-000002.jsonl").unlink()  # as if the run had been killed before this block was written
    again = score_batch(index, prepared, out, K, block_queries=10, progress=False, output_format="jsonl")
    assert (first.blocks_written, again.blocks_written, again.blocks_skipped) == (4, 1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert {name for name in after if after[name] != before.get(name)} == {"part-000002.jsonl"}
    exact = _brute_force(index, prepared)
    for q, record in enumerate(read_batch(out)):
        assert record["proponent_ids"] == index.ids[np.lexsort((index.ids, -exact[q]))[:K]].tolist()
    with pytest.raises(IndexOptionsError, match="another batch"):
        score_batch(index, index.prepare(raw, weights * 2), out, K, block_queries=10, progress=False)


def test_batch_scoring_keeps_every_near_tie_of_the_kth(tmp_path):
    """Exact duplicates of the best and worst rows straddle the k-th place, and rows one ulp from them (exact
    scores apart by far less than float32 resolves): every one is a candidate of the float32 scan, so the exact
    re-score ranks them with ties broken by id, as a brute force does; over two row ranges as over one."""
    rng = np.random.default_rng(8)
    spec = synthetic_spec([("w", 9, 4)])
    rows = rng.standard_normal((300, spec.dim)).astype(np.float32)
    query = rng.standard_normal((1, 1, spec.dim)).astype(np.float32)
    exact = rows.astype(np.float64) @ query[0, 0].astype(np.float64)
    best, worst = int(np.argmax(exact)), int(np.argmin(exact))
    for at, source in [(17, best), (101, best), (250, worst), (251, worst)]:
        rows[at] = rows[source]
    for at, source in [(40, best), (260, worst)]:
        rows[at] = rows[source]
        rows[at, 5] = np.nextafter(rows[at, 5], np.inf if query[0, 0, 5] > 0 else -np.inf, dtype=np.float32)
    store = write_store(tmp_path / "run.zarr", spec, {"c0": (0.1, rows)}, dtype="float32", chunk_rows=64)
    index = GradientIndex.build(store, IndexOptions(), tmp_path / "run.index", progress=False)
    prepared = index.prepare(query, [1.0])
    exact = _brute_force(index, prepared)[0]
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        score_batch(index, prepared, out, 2, chunk_rows=50, workers=workers, output_format="jsonl", progress=False)
        (record,) = read_batch(out)
        assert record["proponent_ids"] == index.ids[np.lexsort((index.ids, -exact))[:2]].tolist()
        assert record["opponent_ids"] == index.ids[np.lexsort((index.ids, exact))[:2]].tolist()
    assert (tmp_path / "out-1" / "part-000000.jsonl").read_bytes() == (
        tmp_path / "out-2" / "part-000000.jsonl"
    ).read_bytes()
