"""The index API split in two: :func:`build_index` / :func:`update_index` write an index and say what they did,
loading nothing; :meth:`GradientIndex.open` loads, searched with :class:`SearchOptions`; :class:`BuildOptions` and
:class:`SearchOptions` are the two parts of :class:`IndexOptions`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import (
    BuildOptions,
    GradientIndex,
    GradientStore,
    IndexMismatchError,
    IndexOptions,
    IndexOptionsError,
    SearchOptions,
    UpdateSummary,
    build_index,
    update_index,
)
from gradstore.store import index as index_module
from gradstore.store.index_options import BUILD_FIELDS
from gradstore.store.search import BACKENDS
from gradstore.store.shards import ShardedBackend
from tests.helpers.search import synthetic_spec, write_store

README = Path(__file__).resolve().parents[1] / "README.md"
LRS = {"c0": 0.1, "c1": 0.05}


def _rows(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((n, dim)).astype(np.float32) for name in LRS}


def _store(path: Path, rows: dict[str, np.ndarray], committed_rows: int | None = None) -> GradientStore:
    """A store of ``rows`` per checkpoint (D = 16); ``committed_rows``: only the chunks of the first rows so far."""
    spec = synthetic_spec([("w", 4, 4)])
    checkpoints = {name: (LRS[name], r) for name, r in rows.items()}
    return write_store(path, spec, checkpoints, chunk_rows=32, committed_rows=committed_rows)


def _no_loading(monkeypatch) -> None:
    """Every backend's load (and the index's own) fails: what runs now must not load the index."""

    def refuse(*args, **kwargs):
        raise AssertionError("the index was loaded")

    for backend in {*BACKENDS.values(), ShardedBackend}:
        monkeypatch.setattr(backend, "load", refuse)
    monkeypatch.setattr(GradientIndex, "__init__", refuse)


def _answers(index: GradientIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ids and exact scores of the top proponents and opponents."""
    found = index.search(queries, list(LRS.values()), k=7)
    return (
        index.ids[found.proponent_rows],
        found.proponent_scores,
        index.ids[found.opponent_rows],
        found.opponent_scores,
    )


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_build_index_returns_a_summary_and_loads_nothing(tmp_path, monkeypatch, kind):
    store = _store(tmp_path / "s.zarr", _rows(120, 16, 0))
    _no_loading(monkeypatch)
    summary = build_index(store, BuildOptions(kind=kind, nlist=4), tmp_path / "s.index", progress=False)
    assert isinstance(summary, UpdateSummary)
    assert (summary.path, summary.num_rows, summary.checkpoints) == (tmp_path / "s.index", 120, ("c0", "c1"))
    assert summary.rebuilt == "a full build" and summary.vectors_computed == 240 and summary.seconds > 0
    assert (tmp_path / "s.index" / "manifest.json").is_file()
    monkeypatch.undo()
    index = GradientIndex.open(tmp_path / "s.index", store)
    assert index.num_rows == 120 and index.options == IndexOptions(kind=kind, nlist=4)  # search part: defaults


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_update_index_appends_and_equals_a_fresh_build(tmp_path, monkeypatch, kind):
    options = BuildOptions(kind=kind, nlist=4)
    rows = _rows(160, 16, 1)
    grown = tmp_path / "grown.zarr"
    store = _store(grown, rows, committed_rows=96)  # 3 of 5 chunks logged
    first = build_index(store, options, tmp_path / "grown.index", progress=False)
    assert first.num_rows == 96
    store = _store(grown, rows)  # the logging pass resumed: the other 64 rows
    _no_loading(monkeypatch)
    summary = update_index(tmp_path / "grown.index", store, progress=False)
    monkeypatch.undo()
    assert summary.rebuilt is None and summary.appended_rows == 64 and summary.num_rows == 160
    assert (summary.parts_reused, summary.parts_written) == (2, 2)  # each checkpoint's first part kept
    assert summary.vectors_computed == 128 and summary.checkpoints == ("c0", "c1")
    if kind == "ivf":
        assert summary.faiss == "added 64 rows"
    assert summary.describe().startswith("appended 64 rows")

    fresh_store = _store(tmp_path / "fresh.zarr", rows)
    fresh = GradientIndex.build(fresh_store, options, tmp_path / "fresh.index", progress=False)
    assert fresh.changes is not None and fresh.changes.path == tmp_path / "fresh.index"
    updated = GradientIndex.open(tmp_path / "grown.index", store, options=SearchOptions(nprobe=4))
    fresh = GradientIndex.open(tmp_path / "fresh.index", fresh_store, options=SearchOptions(nprobe=4))
    queries = np.random.default_rng(2).standard_normal((3, 2, 16)).astype(np.float32)
    for got, want in zip(_answers(updated, queries), _answers(fresh, queries), strict=True):
        np.testing.assert_array_equal(got, want)


def test_update_index_with_build_options_keeps_the_search_options(tmp_path):
    store = _store(tmp_path / "s.zarr", _rows(80, 16, 3))
    build_index(store, IndexOptions(kind="ivf", nlist=4, nprobe=2, rerank=5), tmp_path / "s.index", progress=False)
    summary = update_index(tmp_path / "s.index", store, options=BuildOptions(kind="ivf", nlist=4), progress=False)
    assert summary.rebuilt is None and summary.appended_rows == 0
    index = GradientIndex.open(tmp_path / "s.index", store)
    assert index.options.search == SearchOptions(nprobe=2, rerank=5)
    changed = update_index(tmp_path / "s.index", store, options=BuildOptions(kind="ivf", nlist=8), progress=False)
    assert changed.rebuilt == "the build options changed"


def test_convenience_methods_still_build_and_open(tmp_path):
    store = _store(tmp_path / "s.zarr", _rows(60, 16, 4))
    built = GradientIndex.build(store, IndexOptions(kind="flat"), tmp_path / "s.index", progress=False)
    assert built.num_rows == 60 and built.changes is not None and built.changes.rebuilt == "a full build"
    updated = GradientIndex.update(tmp_path / "s.index", store, progress=False)
    assert updated.changes is not None and updated.changes.parts_reused == 2 and updated.changes.parts_written == 0
    rebuilt = GradientIndex.rebuild(tmp_path / "s.index", store, progress=False)
    assert rebuilt.changes is not None and rebuilt.changes.rebuilt == "a full build"


def test_open_with_search_options_sets_them_and_refuses_nothing(tmp_path):
    store = _store(tmp_path / "s.zarr", _rows(200, 16, 5))
    build_index(store, BuildOptions(kind="ivf", nlist=8), tmp_path / "s.index", progress=False)
    default = GradientIndex.open(tmp_path / "s.index", store)
    assert default.backend.index.nprobe == 2  # nlist / 4
    wide = GradientIndex.open(tmp_path / "s.index", store, options=SearchOptions(nprobe=8, rerank=3))
    assert wide.backend.index.nprobe == 8 and wide.backend.rerank == 3
    assert wide.options == IndexOptions.of(default.options.build, SearchOptions(nprobe=8, rerank=3))
    queries = np.random.default_rng(6).standard_normal((4, 2, 16)).astype(np.float32)
    # every list visited and rerank * k candidates re-scored: the exact answer, as a flat index gives it
    flat = GradientIndex.build(store, IndexOptions(kind="flat"), tmp_path / "flat.index", progress=False)
    exhaustive = GradientIndex.open(tmp_path / "s.index", store, options=SearchOptions(nprobe=8, rerank=100))
    for got, want in zip(_answers(exhaustive, queries), _answers(flat, queries), strict=True):
        np.testing.assert_array_equal(got, want)
    # IndexOptions still check the build part against the manifest
    with pytest.raises(IndexMismatchError, match="built with other options"):
        GradientIndex.open(tmp_path / "s.index", store, options=IndexOptions(kind="ivf", nlist=16))


def test_build_and_search_options_are_the_parts_of_index_options():
    build = BuildOptions(kind="hnsw", preconditioner="kfac", normalize=True, hnsw_m=16, block_rows=100)
    search = SearchOptions(ef_search=64, rerank=4, resident_mb=0)
    both = IndexOptions.of(build, search)
    assert both.build == build and both.search == search
    assert IndexOptions.of(build).search == SearchOptions()
    assert IndexOptions().build == BuildOptions() and IndexOptions().search == SearchOptions()
    names = [f.name for f in dataclasses.fields(IndexOptions)]
    parts = [f.name for part in (BuildOptions, SearchOptions) for f in dataclasses.fields(part)]
    assert sorted(names) == sorted(parts) and len(set(parts)) == len(parts)
    assert set(BUILD_FIELDS) == {f.name for f in dataclasses.fields(BuildOptions)} - {"train_rows", "block_rows"}
    assert both.build_key() == build.build_key()
    # one help string per field, shared by IndexOptions (the [index] table's descriptions)
    helps = {f.name: f.metadata["help"] for part in (BuildOptions, SearchOptions) for f in dataclasses.fields(part)}
    assert {f.name: f.metadata["help"] for f in dataclasses.fields(IndexOptions)} == helps
    assert all(helps.values())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BuildOptions(kind="annoy"), "index kind must be one of"),  # type: ignore[arg-type]
        (lambda: BuildOptions(preconditioner="adam"), "preconditioner must be one of"),  # type: ignore[arg-type]
        (lambda: BuildOptions(mix=1.5), r"mix \(lambda\) must be in \[0, 1\]"),
        (lambda: BuildOptions(damping=0), "damping must be positive"),
        (lambda: BuildOptions(kind="flat", on_disk=True), "on_disk needs an inverted-list kind"),
        (lambda: BuildOptions(nlist=0), "nlist must be a positive integer"),
        (lambda: BuildOptions(shards=0), "shards must be a positive integer"),
        (lambda: BuildOptions(block_rows=0), "block_rows must be a positive integer"),
        (lambda: SearchOptions(nprobe=0), "nprobe must be a positive integer"),
        (lambda: SearchOptions(resident_mb=-1), "resident_mb must be 0"),
        (lambda: SearchOptions(rerank=0), "rerank must be a positive integer"),
        (lambda: IndexOptions(ef_search=0), "ef_search must be a positive integer"),
        (lambda: IndexOptions(hnsw_m=0), "hnsw_m must be a positive integer"),
    ],
)
def test_options_refuse_bad_values(make, message):
    with pytest.raises(IndexOptionsError, match=message):
        make()


def test_readme_build_index_snippet_runs(tmp_path, monkeypatch):
    """The README's build_index / open paragraph, on a small synthetic store at its path."""
    snippet = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [block for block in snippet if "build_index(" in block]
    monkeypatch.chdir(tmp_path)
    _store(tmp_path / "runs" / "my.zarr", _rows(50, 16, 7))
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["summary"].num_rows == 50 and namespace["index"].num_rows == 50


def test_build_index_default_path_and_options(tmp_path):
    store = _store(tmp_path / "s.zarr", _rows(40, 16, 8))
    summary = build_index(store, progress=False)
    assert summary.path == index_module.default_index_path(store.path) == tmp_path / "s.index"
    assert GradientIndex.open(summary.path, store).options == IndexOptions()
