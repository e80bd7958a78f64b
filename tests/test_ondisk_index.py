"""On-disk approximate indexes (``on_disk=True``): FAISS OnDiskInvertedLists built streaming, memory-mapped at load,
candidates re-scored exactly from the store's rows (issue 12, "past RAM")."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest

from gradstore.store import GradientIndex, IndexOptions, IndexOptionsError
from gradstore.store.search import ON_DISK_FILE, IvfSqBackend
from gradstore.store.vectors import VectorSource

from .helpers.search import gradient_like, synthetic_spec, write_store

N, K, LRS = 3000, 10, (0.1, 0.05)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """N = 3000 float16 rows at two checkpoints, D = 256 each (index width 512), heavy-tailed norms; 8 queries."""
    rng = np.random.default_rng(7)
    spec = synthetic_spec([("w", 16, 16)])
    rows, basis, centers = gradient_like(rng, N, spec.dim, clusters=16, rank=8)
    later, _, _ = gradient_like(rng, N, spec.dim, basis=basis, centers=centers)
    queries, _, _ = gradient_like(rng, 8, spec.dim, basis=basis, centers=centers)
    directory = tmp_path_factory.mktemp("ondisk")
    data = {"c0": (LRS[0], rows), "c1": (LRS[1], 0.5 * rows + later)}
    store = write_store(directory / "run.zarr", spec, data, dtype="float16", chunk_rows=256)
    flat = GradientIndex.build(store, IndexOptions(kind="flat"), path=directory / "flat.index", progress=False)
    raw = np.stack([queries, queries], axis=1)  # [B, C, D]
    return store, flat, raw, directory


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("kind", ["ivfsq", "ivfpq"])
def test_on_disk_recall_and_exact_scores(two_checkpoints, kind, capfd):
    store, flat, raw, directory = two_checkpoints
    options = IndexOptions(kind=kind, on_disk=True, nprobe=24, block_rows=500, pq_m=16)
    index = GradientIndex.build(store, options, path=directory / f"{kind}.index", progress=False)
    assert capfd.readouterr().out == ""  # FAISS's printf progress does not reach stdout (a CLI's JSON)
    names = {p.name for p in index.path.rglob("*")}
    assert {"faiss.index", ON_DISK_FILE} <= names and not [n for n in names if n.startswith("shard-")]
    invlists = faiss.extract_index_ivf(index.backend.index).invlists
    assert invlists is not None
    lists = faiss.downcast_InvertedLists(invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and index.backend.index.ntotal == N
    assert index.backend.exact_vectors(np.arange(3)) is None  # candidates are re-read from the store
    exact, found = flat.search(raw, LRS, K), index.search(raw, LRS, K)
    vectors = flat.exact_vectors(np.arange(N)).astype(np.float64)
    queries = flat.prepare_queries(raw, np.asarray(LRS)).astype(np.float64)
    for rows, scores, truth_rows in (
        (found.proponent_rows, found.proponent_scores, exact.proponent_rows),
        (found.opponent_rows, found.opponent_scores, exact.opponent_rows),
    ):
        truth = np.einsum("bkd,bd->bk", vectors[rows], queries)
        np.testing.assert_allclose(scores, truth, rtol=1e-12, atol=1e-12 * np.abs(truth).max())
        recall = _recall(rows, truth_rows)
        print(f"{kind} on disk: recall@10 {recall:.3f}")
        assert recall >= 0.9
    # where both found a row, the re-scored score is flat's score of it
    for b in range(len(raw)):
        flat_score = dict(zip(exact.proponent_rows[b].tolist(), exact.proponent_scores[b], strict=True))
        shared = [
            (r, s) for r, s in zip(found.proponent_rows[b].tolist(), found.proponent_scores[b]) if r in flat_score
        ]
        assert shared and all(np.isclose(s, flat_score[r], rtol=1e-12) for r, s in shared)


def test_on_disk_lists_equal_in_memory_lists(two_checkpoints):
    """Sharded block-by-block encoding merged on disk gives the same index as adding every row in RAM."""
    store, _, raw, directory = two_checkpoints
    base = dict(kind="ivfsq", nprobe=8, rerank=3)
    ram = GradientIndex.build(store, IndexOptions(**base), path=directory / "ram.index", progress=False)
    disk = GradientIndex.build(
        store, IndexOptions(**base, on_disk=True, block_rows=700), path=directory / "disk.index", progress=False
    )
    queries = ram.prepare_queries(raw, LRS)
    a, b = ram.backend.candidates(queries, K), disk.backend.candidates(queries, K)
    np.testing.assert_array_equal(a.proponent_rows, b.proponent_rows)
    np.testing.assert_array_equal(a.opponent_rows, b.opponent_rows)
    np.testing.assert_array_equal(ram.sqnorms, disk.sqnorms)


def test_on_disk_build_reads_blocks_not_the_matrix(tmp_path, monkeypatch):
    n = 12000  # a float32 [n, C*D] matrix of 24.6 MB; the build holds the sample and a few blocks (~4 MB)
    rng = np.random.default_rng(1)
    spec = synthetic_spec([("w", 16, 16)])
    rows, _, _ = gradient_like(rng, n, spec.dim, clusters=16, rank=8)
    data = {"c0": (LRS[0], rows), "c1": (LRS[1], -rows)}
    store = write_store(tmp_path / "run.zarr", spec, data, dtype="float16", chunk_rows=1024)
    reads: list[int] = []
    original = VectorSource.vectors

    def counted(self, ids):
        reads.append(len(ids))
        return original(self, ids)

    peaks: list[int] = []
    build = IvfSqBackend.build.__func__

    def traced(cls, *args):  # peak Python / NumPy allocations of the backend's build (FAISS's own are bounded)
        tracemalloc.start()
        try:
            return build(cls, *args)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(VectorSource, "vectors", counted)
    monkeypatch.setattr(IvfSqBackend, "build", classmethod(traced))
    options = IndexOptions(kind="ivfsq", on_disk=True, block_rows=300, train_rows=600, nlist=16)
    GradientIndex.build(store, options, path=tmp_path / "streamed.index", progress=False)
    (peak,) = peaks
    assert max(reads) == 300 and sum(reads) == n + 600  # every row once, plus the training sample
    matrix = n * 2 * store.dim * 4
    print(f"peak traced allocations {peak} bytes, matrix {matrix} bytes")
    assert peak < 0.25 * matrix


def test_loading_maps_the_lists_file(two_checkpoints):
    store, _, _, directory = two_checkpoints
    options = IndexOptions(kind="ivfsq", on_disk=True, nlist=16)
    built = GradientIndex.build(store, options, path=directory / "mapped.index", progress=False)
    del built
    index = GradientIndex.open(directory / "mapped.index", store, options=options)
    lists_file = str((index.path / ON_DISK_FILE).resolve())
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(lists_file)]
    assert mapped and all(line.split()[1].startswith("r-") for line in mapped)  # mapped read-only, not read in
    size = (index.path / ON_DISK_FILE).stat().st_size
    assert size == N * faiss.extract_index_ivf(index.backend.index).code_size + N * 8  # codes + ids


def test_on_disk_needs_inverted_lists():
    with pytest.raises(IndexOptionsError, match=r"on_disk needs an inverted-list kind .*got kind='hnsw'"):
        IndexOptions(kind="hnsw", on_disk=True)
