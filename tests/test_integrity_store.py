"""Integrity of a store's records and of what an index reuses from it (issue 21, items 1, 3, 4).

* Reuse is keyed by content: an index update after rows were re-logged or re-captured under the same ids rewrites
  their parts, so it answers as a fresh build (ids and scores equal), never with the old vectors.
* Commit records, checksum records and metadata form one chain: a deleted link is a ``StoreCorruptError`` (or a
  ``verify`` line) naming the file and the fix, never rows silently dropped or a duplicate segment written.
* A write cut short (a killed writer) is not damage: readers see the committed rows only.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import (
    AppendWriter,
    BackgroundWriter,
    CheckpointInfo,
    DiskFullError,
    GradientIndex,
    GradientStore,
    IndexOptions,
    StoreCorruptError,
    parts,
)
from tests.helpers.search import synthetic_spec, write_store

CHUNK = 16
N = 80  # 5 chunks per checkpoint


def _spec():
    return synthetic_spec([("a", 6, 5), ("b", 4, 3)])


def _pass_store(path: Path, seed: int = 0, checkpoints=("c0", "c1")) -> GradientStore:
    rng = np.random.default_rng(seed)
    data = {name: (0.1 / (i + 1), rng.standard_normal((N, _spec().dim))) for i, name in enumerate(checkpoints)}
    return write_store(path, _spec(), data, dtype="float32", chunk_rows=CHUNK)


def _capture_store(path: Path, seed: int = 0, flush_every: int = 20) -> GradientStore:
    """Checkpoint ``c0`` captured in steps of ``flush_every`` rows (each step flushed: a partial chunk each time)."""
    store = GradientStore.create(path, _spec(), dtype="float32", chunk_rows=CHUNK)
    store.begin_checkpoint(CheckpointInfo(name="c0", lr=0.1))
    rows = np.random.default_rng(seed).standard_normal((N, store.dim)).astype(np.float32)
    writer = AppendWriter(store, "c0", "r0", BackgroundWriter(synchronous=True))
    for lo in range(0, N, flush_every):
        writer.append(np.arange(lo, lo + flush_every), rows[lo : lo + flush_every])
        writer.flush()
    return GradientStore.open(path)


def _segment_dir(store: GradientStore, checkpoint: str = "c0") -> Path:
    (segment,) = store.segments(checkpoint)
    return Path(segment.directory)


def _answers(index: GradientIndex, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    raw = np.random.default_rng(1).standard_normal((3, len(index.checkpoints), index.dim)).astype(np.float32)
    found = index.search(raw, np.ones(len(index.checkpoints)), k)
    return index.ids[found.proponent_rows], found.proponent_scores


def _assert_answers_equal(got: GradientIndex, want: GradientIndex) -> None:
    got_ids, got_scores = _answers(got)
    want_ids, want_scores = _answers(want)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)


# -- item 1: reuse keyed by content --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_update_after_relogging_a_checkpoint_rewrites_its_parts(tmp_path, kind):
    """Delete a checkpoint's rows and log them again (other weights, same ids): the update writes its parts again
    and answers as a fresh build; before, it printed "reused 2 parts, wrote 0" and kept the old vectors."""
    store = _pass_store(tmp_path / "s.zarr")
    options = IndexOptions(kind=kind, preconditioner="identity", normalize=False)
    old = GradientIndex.build(store, options, tmp_path / "i.index", progress=False)
    old_ids, _ = _answers(old)

    shutil.rmtree(tmp_path / "s.zarr" / "checkpoints" / "c0")
    relogged = np.random.default_rng(99).standard_normal((N, store.dim))
    store = write_store(tmp_path / "s.zarr", _spec(), {"c0": (0.1, relogged)}, dtype="float32", chunk_rows=CHUNK)
    store = GradientStore.open(tmp_path / "s.zarr")
    updated = GradientIndex.update(tmp_path / "i.index", store, checkpoints=["c0", "c1"], progress=False)
    assert updated.changes is not None
    assert updated.changes.parts_written >= 1, updated.changes.describe()
    if kind == "flat":
        assert (updated.changes.parts_reused, updated.changes.parts_written) == (1, 1)  # c1 kept, c0 rewritten
    fresh = GradientIndex.build(store, options, tmp_path / "fresh.index", ["c0", "c1"], progress=False)
    _assert_answers_equal(updated, fresh)
    assert not np.array_equal(_answers(updated)[0], old_ids)  # the re-logged rows do change the answer
    assert updated.content_problems() == []


def test_update_after_recapturing_a_segment_rewrites_its_part(tmp_path):
    """Delete a captured segment and capture it again with other values: the part is rewritten."""
    store = _capture_store(tmp_path / "s.zarr", seed=0, flush_every=N)
    options = IndexOptions(kind="flat", preconditioner="identity", normalize=False)
    GradientIndex.build(store, options, tmp_path / "i.index", progress=False)

    shutil.rmtree(_segment_dir(store))
    rows = np.random.default_rng(5).standard_normal((N, store.dim)).astype(np.float32)
    writer = AppendWriter(
        GradientStore.open(tmp_path / "s.zarr", mode="a"), "c0", "r0", BackgroundWriter(synchronous=True)
    )
    writer.append(np.arange(N), rows)
    writer.flush()
    store = GradientStore.open(tmp_path / "s.zarr")
    updated = GradientIndex.update(tmp_path / "i.index", store, progress=False)
    assert updated.changes is not None and (updated.changes.parts_reused, updated.changes.parts_written) == (0, 1)
    np.testing.assert_array_equal(updated.exact_vectors(np.argsort(updated.ids)), rows)


def test_content_problems_name_a_part_built_from_other_rows(tmp_path):
    """An index whose part records other rows' checksums (what the old update left behind) is reported."""
    store = _pass_store(tmp_path / "s.zarr")
    index = GradientIndex.build(store, IndexOptions(kind="flat"), tmp_path / "i.index", progress=False)
    index.manifest.parts[0]["content_blake2b"] = "0" * 32
    (problem,) = index.content_problems()
    assert "part 0 of checkpoint 'c0'" in problem and "rebuild it" in problem


# -- items 3 and 4: one chain of records ---------------------------------------------------------------------------


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _refused(store_path: Path, named: str) -> str:
    """The StoreCorruptError every reader and the index build give, and the verify line; returns the message."""
    with pytest.raises(StoreCorruptError) as info:
        store = GradientStore.open(store_path)
        store.read("c0")
        GradientIndex.build(store, progress=False, path=store_path.parent / "refused.index")
    assert named in str(info.value), str(info.value)
    assert not (store_path.parent / "refused.index").exists()
    return str(info.value)


CAPTURE_CASES = {
    # (file under the segment, what the error names)
    "commit record of a middle chunk": ("committed/c/1", "chunk 1"),
    "commit record of the last chunk": ("committed/c/4", "chunk 4"),
    "checksum record of a committed chunk": ("checksums/c/2", "checksums/c/2"),
    "ids metadata": ("ids/zarr.json", "ids/zarr.json is missing"),
    "grads metadata": ("grads/zarr.json", "grads/zarr.json is missing"),
    "checksums metadata": ("checksums/zarr.json", "checksums/zarr.json is missing"),
    "commit metadata": ("committed/zarr.json", "committed/zarr.json is missing"),
    "segment metadata": ("zarr.json", "zarr.json is missing while"),
}


@pytest.mark.parametrize("name", list(CAPTURE_CASES))
def test_a_missing_record_of_a_capture_segment_is_damage_named_everywhere(tmp_path, name):
    file, named = CAPTURE_CASES[name]
    store = _capture_store(tmp_path / "s.zarr")
    reference = GradientIndex.build(store, progress=False, path=tmp_path / "i.index")
    assert store.verify() == []
    segment = _segment_dir(store)
    _delete(segment / file)

    message = _refused(tmp_path / "s.zarr", named)
    assert str(segment) in message and ("restore" in message or "re-log" in message)
    store = GradientStore.open(tmp_path / "s.zarr")
    lines = store.verify()
    assert lines and any(named in line for line in lines), lines
    # the index built before is refused naming the damage, not "the store changed"
    with pytest.raises(StoreCorruptError, match=re.escape(named)):
        GradientIndex.open(reference.path, store)


def test_a_missing_record_of_a_pass_chunk_is_relogged_not_dropped(tmp_path):
    """A pass's deleted commit record: `verify` and the index build name it; a resumed pass re-logs the chunk."""
    store = _pass_store(tmp_path / "s.zarr")
    index = GradientIndex.build(store, progress=False, path=tmp_path / "i.index")
    _delete(_segment_dir(store) / "committed/c/3")
    store = GradientStore.open(tmp_path / "s.zarr")
    assert len(store.read("c0")[0]) == N - CHUNK  # readers see committed rows only (as after a killed writer)
    (line,) = store.verify()
    assert "chunk 3" in line and "no commit record" in line and "gradstore index" in line
    with pytest.raises(StoreCorruptError, match="chunk 3"):
        GradientIndex.open(index.path, store)
    with pytest.raises(StoreCorruptError, match="chunk 3"):
        GradientIndex.build(store, progress=False, path=tmp_path / "j.index")


def test_a_missing_checksum_record_is_damage_not_checking_off(tmp_path):
    """Deleting a committed chunk's checksum record, then garbling the chunk: refused, never indexed."""
    store = _pass_store(tmp_path / "s.zarr")
    segment = _segment_dir(store)
    _delete(segment / "checksums/c/2")
    grads = segment / "grads/c/2/0"
    data = bytearray(grads.read_bytes())
    data[40] ^= 0xFF
    grads.write_bytes(bytes(data))
    _refused(tmp_path / "s.zarr", "checksums/c/2")
    assert any("checksums/c/2" in line for line in GradientStore.open(tmp_path / "s.zarr").verify())


def test_a_missing_fingerprint_record_of_a_pass_chunk_is_damage(tmp_path):
    store = GradientStore.create(tmp_path / "s.zarr", _spec(), dtype="float32", chunk_rows=CHUNK)
    store.begin_checkpoint(CheckpointInfo(name="c0", lr=0.1))
    segment = store.pass_segment("c0", N)
    rows = np.random.default_rng(0).standard_normal((N, store.dim)).astype(np.float32)
    for k in range(segment.n_chunks):
        segment.write_chunk(k, np.arange(k * CHUNK, (k + 1) * CHUNK), rows[k * CHUNK : (k + 1) * CHUNK], 1000 + k)
    _delete(Path(segment.directory) / "fingerprints/c/1")
    counts, damaged = GradientStore.open(tmp_path / "s.zarr").segments("c0")[0].commit_records()
    assert damaged == [1]  # a resumed pass re-logs it (and writes its fingerprint again)
    _refused(tmp_path / "s.zarr", "fingerprints/c/1")


@pytest.mark.parametrize(
    "file, named",
    [
        ("checkpoints/c0/zarr.json", "checkpoints/c0/zarr.json is missing"),
        ("checkpoints/zarr.json", "checkpoints/zarr.json is missing"),
        ("zarr.json", "s.zarr/zarr.json is missing"),
    ],
)
def test_missing_group_metadata_is_damage_and_nothing_is_written_beside_it(tmp_path, file, named):
    """A checkpoint (or the store) whose ``zarr.json`` is gone: refused for reading and for writing (before, a
    writer began the checkpoint afresh and logged a duplicate segment beside the old one)."""
    _capture_store(tmp_path / "s.zarr")
    _delete(tmp_path / "s.zarr" / file)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s.zarr").rglob("*"))
    message = _refused(tmp_path / "s.zarr", named)
    assert "restore" in message
    with pytest.raises(StoreCorruptError, match=re.escape(named)):
        store = GradientStore.open(tmp_path / "s.zarr", mode="a")
        store.begin_checkpoint(CheckpointInfo(name="c0", lr=0.1))
        store.pass_segment("c0", N)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s.zarr").rglob("*")) == before


def test_a_write_cut_short_is_not_damage(tmp_path):
    """A capture writer killed between a chunk's checksum and its commit, after its last flush: the chunk is simply
    not committed (readers see the rest, verify says intact, an index builds)."""
    store = _capture_store(tmp_path / "s.zarr", flush_every=N)  # one flush, after all 5 chunks
    segment = store.segments("c0")[0]
    rows = np.random.default_rng(2).standard_normal((CHUNK, store.dim)).astype(np.float32)
    writable = GradientStore.open(tmp_path / "s.zarr", mode="a").segments("c0")[0]
    original = type(writable).commit_chunk
    try:
        type(writable).commit_chunk = lambda self, chunk, rows: None  # killed before the commit
        writable.write_chunk(5, np.arange(N, N + CHUNK), rows)
    finally:
        type(writable).commit_chunk = original
    store = GradientStore.open(tmp_path / "s.zarr")
    assert store.verify() == [] and len(store.read("c0")[0]) == N
    assert segment.sealed_chunks == 5
    GradientIndex.build(store, progress=False, path=tmp_path / "i.index")


def test_checkpoint_info_keeps_other_attributes_aside(tmp_path):
    """Attributes another feature records on a checkpoint (a verification record, coverage) do not break it."""
    store = _pass_store(tmp_path / "s.zarr", checkpoints=("c0",))
    store = GradientStore.open(tmp_path / "s.zarr", mode="a")
    store._checkpoint_group("c0").attrs.update({"verification": {"max_rel_error": 1e-6}, "coverage": [1, 2]})
    assert GradientStore.open(tmp_path / "s.zarr").checkpoint_info("c0").lr == 0.1


# -- a full disk: one typed error, a resumable state -----------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_an_index_build_is_one_typed_error_and_keeps_the_old_index(tmp_path, monkeypatch):
    store = _pass_store(tmp_path / "s.zarr")
    options = IndexOptions(kind="flat")
    old = GradientIndex.build(store, options, tmp_path / "i.index", progress=False)
    before = _answers(old)
    with monkeypatch.context() as patch:
        patch.setattr(parts.PartWriter, "add", lambda self, block: _raise_in(parts.disk_full_is_typed(self.path)))
        with pytest.raises(DiskFullError, match=r"no space left on the device writing .*part-00000\.npy.*run the"):
            GradientIndex.build(store, options, tmp_path / "i.index", progress=False)
    reopened = GradientIndex.open(tmp_path / "i.index", store)  # the previous index, intact
    _assert_answers_equal(reopened, old)
    np.testing.assert_array_equal(_answers(reopened)[0], before[0])
    assert not list(tmp_path.glob(".i.index.building-*"))  # nothing half-built left behind


def _raise_in(context) -> None:
    with context:
        _enospc()


def test_a_full_disk_during_a_chunk_write_commits_nothing_and_resumes(tmp_path, monkeypatch):
    store = GradientStore.create(tmp_path / "s.zarr", _spec(), dtype="float32", chunk_rows=CHUNK)
    store.begin_checkpoint(CheckpointInfo(name="c0", lr=0.1))
    segment = store.pass_segment("c0", N)
    rows = np.random.default_rng(0).standard_normal((N, store.dim)).astype(np.float32)
    segment.write_chunk(0, np.arange(CHUNK), rows[:CHUNK])
    with monkeypatch.context() as patch:
        patch.setattr(type(segment), "commit_chunk", lambda self, chunk, n: _enospc())
        with pytest.raises(DiskFullError, match="free space and run the command again"):
            segment.write_chunk(1, np.arange(CHUNK, 2 * CHUNK), rows[CHUNK : 2 * CHUNK])
    assert GradientStore.open(tmp_path / "s.zarr").num_rows("c0") == CHUNK  # chunk 1 not committed
    segment.write_chunk(1, np.arange(CHUNK, 2 * CHUNK), rows[CHUNK : 2 * CHUNK])  # the resume writes it
    assert GradientStore.open(tmp_path / "s.zarr").num_rows("c0") == 2 * CHUNK


def test_part_writer_widens_to_float32_on_overflow_without_a_map(tmp_path):
    """Plain writes (no writable map): a float16 part that meets a value past float16's range is rewritten as
    float32, every row exact."""
    blocks = [np.full((3, 4), 1.5, np.float32), np.full((2, 4), 1e6, np.float32), np.full((1, 4), -2.0, np.float32)]
    writer = parts.PartWriter(tmp_path / "p.npy", 6, 4, np.dtype(np.float16))
    for block in blocks:
        writer.add(block)
    assert writer.close() == np.float32
    part = parts.PartFile.open(tmp_path / "p.npy")
    np.testing.assert_array_equal(part.read(0, 6), np.concatenate(blocks))
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), np.concatenate(blocks))
