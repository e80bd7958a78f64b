"""Damaged store files: every case is a typed error naming the damaged file, and re-logging repairs it exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradstore.logger import GradientLogger
from gradstore.store import GradientStore, StoreCorruptError, StoreFormatError

from .helpers.models import MLPTask

N, CHUNK = 40, 8


def _log(path: Path) -> None:
    task = MLPTask(n=N)
    import torch

    torch.manual_seed(0)
    model = task.build_model()
    with GradientLogger(model, task, store=path, rank=4, dtype="float32", chunk_rows=CHUNK, progress=False) as logger:
        logger.log_checkpoint("c0", lr=0.1, batch_size=16)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "run.zarr"
    _log(path)
    return path, GradientStore.open(path).read("c0")


def _garble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])


SEGMENT = "checkpoints/c0/pass"
DAMAGE = {  # name: (file under the store, what is done to it, text the error names)
    "garbled grads chunk": (f"{SEGMENT}/grads/c/2/0", _garble, "chunk 2 (rows 16..23) fails its checksum"),
    "truncated grads chunk": (f"{SEGMENT}/grads/c/2/0", _truncate, "chunk 2 (rows 16..23) cannot be read"),
    "deleted grads chunk": (f"{SEGMENT}/grads/c/2/0", Path.unlink, "chunk 2 (rows 16..23) fails its checksum"),
    "garbled ids chunk": (f"{SEGMENT}/ids/c/3", _garble, "chunk 3 (rows 24..31) fails its checksum"),
    "garbled commit record": (f"{SEGMENT}/committed/c/1", lambda f: f.write_bytes(b"\xff\xff\xff\x7f"), "committed"),
    "empty commit record": (f"{SEGMENT}/committed/c/1", lambda f: f.write_bytes(b""), "committed"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_a_typed_error_and_relogging_repairs_it(tmp_path, pristine, case):
    import shutil

    source, (ref_ids, ref_grads) = pristine
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    relative, damage, named = DAMAGE[case]
    damage(path / relative)
    with pytest.raises(StoreFormatError) as info:
        GradientStore.open(path).read("c0")
    assert isinstance(info.value, StoreCorruptError)
    assert named in str(info.value) and str(Path(SEGMENT)) in str(info.value) and "re-log" in str(info.value)
    (found,) = GradientStore.open(path).verify()  # the walk names the same damage, and only it
    assert named in found

    if "commit record" in case:
        return  # which rows are committed is unknown: the checkpoint must be re-logged under a new name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _log(path)  # the same pass again: only the damaged chunk is recomputed
    assert any("re-logging damaged chunks" in str(w.message) for w in caught)
    assert GradientStore.open(path).verify() == []
    ids, grads = GradientStore.open(path).read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-6)  # the re-logged chunk is batched differently


# -- the index beside the store ---------------------------------------------------------------------------------


def _lrs_edited(file: Path) -> None:
    manifest = json.loads(file.read_text())
    manifest["lrs"] = [lr * 10 for lr in manifest["lrs"]]
    file.write_text(json.dumps(manifest))


INDEX_DAMAGE = {  # name: (index kind, file, damage, text the error names)
    "truncated vectors": ("flat", "vectors.npy", _truncate, "vectors.npy has"),
    "deleted vectors": ("flat", "vectors.npy", Path.unlink, "vectors.npy is missing"),
    "garbled vectors": ("flat", "vectors.npy", _garble, "vectors.npy changed since it was built"),
    "truncated ids": ("flat", "ids.npy", _truncate, "ids.npy has"),
    "truncated preconditioner": ("flat", "preconditioner.npz", _truncate, "preconditioner.npz has"),
    "garbled faiss index": ("hnsw", "faiss.index", _garble, "faiss.index changed since it was built"),
    "edited lrs": ("flat", "manifest.json", _lrs_edited, "records lrs"),
}


@pytest.mark.parametrize("case", list(INDEX_DAMAGE))
def test_index_damage_is_refused_and_a_rebuild_restores_the_answers(tmp_path, pristine, case):
    import shutil

    from gradstore.store import GradientIndex, IndexMismatchError, IndexOptions

    source, _ = pristine
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    kind, name, damage, named = INDEX_DAMAGE[case]
    store = GradientStore.open(path)
    index = GradientIndex.build(store, IndexOptions(kind=kind), progress=False)
    queries = np.random.default_rng(0).normal(size=(2, 1, store.dim)).astype(np.float32)
    before = index.search(queries, [0.1], k=5)
    damage(index.path / name)
    with pytest.raises(IndexMismatchError) as info:
        GradientIndex.open(None, store)
    assert named in str(info.value) and "rebuild" in str(info.value)
    rebuilt = GradientIndex.build(store, IndexOptions(kind=kind), progress=False)
    after = GradientIndex.open(None, store).search(queries, [0.1], k=5)
    np.testing.assert_array_equal(after.proponent_rows, before.proponent_rows)
    np.testing.assert_allclose(after.proponent_scores, before.proponent_scores, rtol=1e-6)
    assert rebuilt.num_rows == N


def test_gradstore_verify_lists_damage_and_exits_2(tmp_path, pristine, capsys):
    """`gradstore verify` walks the store and the index: intact -> exit 0; a damaged chunk and a damaged index file
    are each named on a `damaged:` line, exit 2."""
    import shutil

    from gradstore.server.cli import main
    from gradstore.store import GradientIndex

    source, _ = pristine
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    GradientIndex.build(GradientStore.open(path), progress=False)
    config = tmp_path / "run.toml"
    config.write_text(
        '[task]\nobject = "tests.helpers.models:MLPTask"\nargs = { n = 40 }\n[store]\npath = "run.zarr"\n'
        '[[checkpoints]]\nname = "c0"\npath = "weights.pt"\nlr = 0.1\n'
    )
    (tmp_path / "weights.pt").write_bytes(b"")  # verify opens no model
    main(["verify", "--config", str(config)])
    assert "store and index intact" in capsys.readouterr().out
    _garble(path / f"{SEGMENT}/grads/c/2/0")
    _truncate(path.with_suffix(".index") / "ids.npy")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--config", str(config)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("damaged: ")]
    assert len(lines) == 2
    assert "chunk 2 (rows 16..23) fails its checksum" in lines[0] and "ids.npy has" in lines[1]


def test_index_build_refuses_a_damaged_chunk_instead_of_indexing_it(tmp_path, pristine):
    """The build reads whole chunks verified: a garbled chunk is an error naming it, not NaN rows in the index."""
    import shutil

    from gradstore.store import GradientIndex

    source, _ = pristine
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    _garble(path / f"{SEGMENT}/grads/c/2/0")
    with pytest.raises(StoreCorruptError, match=r"chunk 2 \(rows 16..23\) fails its checksum"):
        GradientIndex.build(GradientStore.open(path), progress=False)
    assert not path.with_suffix(".index").exists()
