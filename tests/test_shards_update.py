"""Updating a sharded index (issue 19): new example ids become one new shard (a complete unit of the index's kind,
built from the appended rows only, with the index's fitted preconditioners), every existing shard is kept byte for
byte, and the search answers with the ids and scores of a fresh sharded build of the grown store. A refit or a new
checkpoint builds every shard again, and says so."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import GradientIndex, GradientStore, IndexOptions, SearchOptions
from gradstore.store.manifest import IndexManifest
from gradstore.store.shards import ShardedBackend, shard_ranges
from tests.helpers.search import synthetic_spec, write_store
from tests.test_incremental import _append

N, NEW = 500, 120
NEW_IDS = np.arange(N + 7, N + 7 + 2 * NEW, 2)  # ids after every stored one, with gaps


def _store(tmp_path: Path, dtype: str = "float32", checkpoints: int = 2) -> GradientStore:
    rng = np.random.default_rng(3)
    spec = synthetic_spec([("w", 9, 4)])
    rows = {f"c{i}": (0.1 / (i + 1), rng.standard_normal((N, spec.dim))) for i in range(checkpoints)}
    return write_store(tmp_path / "run.zarr", spec, rows, dtype=dtype, chunk_rows=64)


def _grow(store: GradientStore, ids: np.ndarray = NEW_IDS, names: tuple[str, ...] = ("c0", "c1")) -> GradientStore:
    rng = np.random.default_rng(len(ids))
    store = GradientStore.open(store.path, mode="a")
    for name in names:
        _append(store, name, ids, rng.standard_normal((len(ids), store.dim)), f"{name}-{len(ids)}")
    return GradientStore.open(store.path)


def _answers(index: GradientIndex, raw: np.ndarray, weights: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """What a search answers, in ids (rows differ between layouts; ids and exact scores do not)."""
    found = index.search(raw, weights, k)
    return {
        "pro_ids": index.ids[found.proponent_rows],
        "pro": found.proponent_scores,
        "pro_c": found.proponent_contributions,
        "opp_ids": index.ids[found.opponent_rows],
        "opp": found.opponent_scores,
        "opp_c": found.opponent_contributions,
    }


def _assert_same_answers(got: GradientIndex, want: GradientIndex, rng: np.random.Generator, c: int = 2) -> None:
    for _ in range(3):  # random checkpoint weights, a negative and a dropped one among them
        weights = rng.normal(size=c)
        weights[rng.integers(c)] = 0.0 if rng.random() < 0.5 else -abs(weights[0])
        raw = rng.standard_normal((4, c, got.dim)).astype(np.float32)
        a, b = _answers(got, raw, weights), _answers(want, raw, weights)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    if got.options.kind == "flat":  # every row scored: the statistics too (float32 scans of other row blocks)
        raw = rng.standard_normal((2, c, got.dim)).astype(np.float32)
        a, b = got.search(raw, np.ones(c), 5), want.search(raw, np.ones(c), 5)
        np.testing.assert_allclose(a.mean_abs_score, b.mean_abs_score, rtol=1e-6)
        np.testing.assert_allclose(a.max_abs_score, b.max_abs_score, rtol=1e-6)


def _shard_files(path: Path, manifest: IndexManifest) -> dict[str, tuple[int, bytes]]:
    """Every file of every shard (flat: its row parts' files; FAISS kinds: its folder): inode and bytes."""
    if manifest.options.kind == "flat":
        names = {p["file"] for p in manifest.parts}
    else:
        names = {name for name in manifest.files if name.startswith("shards/")}
    return {name: (os.stat(path / name).st_ino, (path / name).read_bytes()) for name in sorted(names)}


@pytest.mark.parametrize(
    ("kind", "dtype", "extra"),
    [
        ("flat", "float16", {}),
        ("flat", "float32", {"normalize": True}),
        ("ivf", "float32", {"nlist": 4, "nprobe": 4}),  # every list probed: exhaustive
        ("hnsw", "float32", {"rerank": 100}),  # k * rerank >= a shard's rows: every row a candidate
        ("ivfsq", "float32", {"nlist": 4, "nprobe": 4, "rerank": 100, "on_disk": True}),  # lists beside the index
    ],
)
def test_update_appends_one_shard_and_equals_a_fresh_sharded_build(tmp_path, kind, dtype, extra):
    store = _store(tmp_path, dtype)
    options = IndexOptions(kind=kind, shards=3, **extra)
    path = tmp_path / "i.index"
    GradientIndex.build(store, options, path, progress=False)
    before = IndexManifest.read(path)
    old_files = _shard_files(path, before)
    assert len(old_files) == (6 if kind == "flat" else 6 if extra.get("on_disk") else 3)
    opened = GradientIndex.open(path, store)  # opened before the update: keeps answering from its snapshot
    rng = np.random.default_rng(11)
    raw = rng.standard_normal((3, 2, store.dim)).astype(np.float32)
    answered = _answers(opened, raw, np.ones(2))

    grown = _grow(store)
    updated = GradientIndex.update(path, grown, progress=False)

    changes = updated.changes
    assert changes is not None and changes.rebuilt is None, changes
    assert (changes.appended_rows, changes.shards, changes.shards_reused) == (NEW, 4, 3)
    assert changes.checkpoints_added == [] and changes.refitted == []
    old_parts = 3 if kind == "flat" else 1  # flat: a row part per shard; FAISS kinds: the build's one row part
    assert (changes.parts_reused, changes.parts_written) == (2 * old_parts, 2)
    assert changes.vectors_computed == 2 * NEW  # the appended rows only
    assert "kept 3 of 4 shards" in changes.describe()
    if kind != "flat":
        assert changes.faiss == "built 1 shards"
    manifest = updated.manifest
    assert [s["rows"] for s in manifest.shards] == [*shard_ranges(N, 3), [N, N + NEW]]
    assert manifest.options.shards == 3  # the option as asked; the new rows are a fourth shard
    assert isinstance(updated.backend, ShardedBackend) and len(updated.backend.shards) == 4
    np.testing.assert_array_equal(updated.ids[N:], NEW_IDS)
    # the old shards' files: the same bytes, the same files (hard links)
    assert _shard_files(path, manifest).items() >= old_files.items()
    for name in ("preconditioners/c0.npz", "preconditioners/c1.npz"):
        assert manifest.files[name] == before.files[name]

    # verify: every file against the manifest (hashed, none skipped), the parts against the store's rows
    IndexManifest.read(path).check_files(path)
    assert updated.content_problems() == [] and grown.verify() == []

    fresh = GradientIndex.build(grown, options, tmp_path / "fresh.index", progress=False)
    assert len(fresh.manifest.shards) == 3
    order, fresh_order = np.argsort(updated.ids), np.argsort(fresh.ids)
    np.testing.assert_array_equal(updated.ids[order], fresh.ids[fresh_order])
    np.testing.assert_array_equal(updated.sqnorms[order], fresh.sqnorms[fresh_order])
    _assert_same_answers(updated, fresh, np.random.default_rng(5))
    _assert_same_answers(GradientIndex.open(path, grown), fresh, np.random.default_rng(6))
    if kind == "flat":  # streamed from disk in blocks rather than resident: the same answers
        streamed = GradientIndex.open(path, grown, options=SearchOptions(resident_mb=0))
        _assert_same_answers(streamed, fresh, np.random.default_rng(7))

    # the index opened before the update answers as it did
    again = _answers(opened, raw, np.ones(2))
    for key in answered:
        np.testing.assert_array_equal(again[key], answered[key], err_msg=key)

    # nothing new: every shard kept, nothing written
    same = GradientIndex.update(path, grown, progress=False).changes
    assert same is not None and same.rebuilt is None
    assert (same.appended_rows, same.parts_written, same.shards, same.shards_reused) == (0, 0, 4, 4)


def test_a_second_update_adds_a_second_shard(tmp_path):
    store = _store(tmp_path)
    options = IndexOptions(kind="ivf", shards=2, nlist=4, nprobe=4)
    path = tmp_path / "i.index"
    GradientIndex.build(store, options, path, progress=False)
    grown = _grow(store)
    GradientIndex.update(path, grown, progress=False)
    more = np.arange(2000, 2060)
    grown = _grow(grown, more)
    updated = GradientIndex.update(path, grown, progress=False)
    changes = updated.changes
    assert changes is not None and changes.rebuilt is None
    assert (changes.appended_rows, changes.shards, changes.shards_reused, changes.vectors_computed) == (60, 4, 3, 120)
    assert [s["rows"] for s in updated.manifest.shards][2:] == [[N, N + NEW], [N + NEW, N + NEW + 60]]
    assert updated.content_problems() == []
    fresh = GradientIndex.build(grown, options, tmp_path / "fresh.index", progress=False)
    _assert_same_answers(updated, fresh, np.random.default_rng(1))


def test_a_refit_or_a_new_checkpoint_builds_every_shard_again(tmp_path):
    store = _store(tmp_path, checkpoints=3)
    path = tmp_path / "k.index"
    kfac = IndexOptions(kind="flat", shards=3, preconditioner="kfac")
    GradientIndex.build(store, kfac, path, ["c0", "c1"], progress=False)
    grown = _grow(store, names=("c0", "c1", "c2"))
    updated = GradientIndex.update(path, grown, progress=False)
    changes = updated.changes
    assert changes is not None and changes.rebuilt is not None
    assert "refitted" in changes.rebuilt and "built whole" in changes.rebuilt, changes.rebuilt
    assert (changes.shards, changes.shards_reused) == (3, 0)
    assert [s["rows"] for s in updated.manifest.shards] == shard_ranges(N + NEW, 3)
    fresh = GradientIndex.build(grown, kfac, tmp_path / "fresh-k.index", ["c0", "c1"], progress=False)
    _assert_same_answers(updated, fresh, np.random.default_rng(2))

    # identity: a new checkpoint changes every shard's vectors (FAISS: the concatenated width): built whole
    ivf = IndexOptions(kind="ivf", shards=2, nlist=4, nprobe=4)
    GradientIndex.build(grown, ivf, tmp_path / "i.index", ["c0", "c1"], progress=False)
    updated = GradientIndex.update(tmp_path / "i.index", grown, checkpoints=["c0", "c1", "c2"], progress=False)
    changes = updated.changes
    assert changes is not None and changes.rebuilt is not None
    assert "checkpoints ['c2'] were added" in changes.rebuilt and "built whole" in changes.rebuilt, changes.rebuilt
    assert isinstance(updated.backend, ShardedBackend) and (changes.shards, len(updated.backend.shards)) == (2, 2)
    assert updated.content_problems() == []


def test_too_few_new_rows_for_a_shard_of_their_own_build_every_shard_again(tmp_path):
    store = _store(tmp_path)
    options = IndexOptions(kind="ivf", shards=2, nlist=8, nprobe=8)
    path = tmp_path / "i.index"
    GradientIndex.build(store, options, path, progress=False)
    grown = _grow(store, np.array([900, 901, 902]))
    updated = GradientIndex.update(path, grown, progress=False)
    changes = updated.changes
    assert changes is not None and changes.rebuilt is not None and "too few" in changes.rebuilt, changes
    assert [s["rows"] for s in updated.manifest.shards] == shard_ranges(N + 3, 2)
    fresh = GradientIndex.build(grown, options, tmp_path / "fresh.index", progress=False)
    _assert_same_answers(updated, fresh, np.random.default_rng(3))
