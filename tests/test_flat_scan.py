"""The streamed flat scan: part files read in cache-sized pieces, scored into blocks, merged over row parts; its
candidates are the exact top / bottom ``k`` of a brute force, whatever the piece, block and row-part boundaries."""

from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import pytest
import torch

from gradstore.store import search
from gradstore.store.errors import IndexMismatchError
from gradstore.store.parts import PartFile, PartWriter
from gradstore.store.scoring import PreparedQueries
from gradstore.store.search import FlatBackend, _runs, _Within

D, C = 48, 3


def _backend(tmp_path, parts: list[np.ndarray], dtype: str) -> FlatBackend:
    """A streamed flat backend over row parts ``parts`` (each ``[n, C, D]``), written in ``dtype``."""
    files, starts, start = [], [], 0
    for r, rows in enumerate(parts):
        row = []
        for c in range(C):
            writer = PartWriter(tmp_path / f"p{r}-{c}.npy", len(rows), D, np.dtype(dtype))
            writer.add(rows[:, c])
            writer.close()
            row.append(PartFile.open(tmp_path / f"p{r}-{c}.npy"))
        files.append(row)
        starts.append(start)
        start += len(rows)
    return FlatBackend(starts, files, D, torch.device("cpu"), resident_bytes=0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize(("piece_rows", "block_rows", "threads"), [(7, 50, 1), (64, 64, 2), (5, 33, 3), (4, 300, 2)])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_streamed_scan_in_pieces_is_the_exact_top_k(
    tmp_path, monkeypatch, dtype, piece_rows, block_rows, threads, mapped
):
    if not mapped:  # files that cannot be mapped are read in pieces with preadv
        monkeypatch.setattr(PartFile, "mapped", lambda self: None)
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, C, D)).astype(dtype) for n in (1001, 777, 5)]
    backend = _backend(tmp_path, parts, dtype)
    monkeypatch.setattr(FlatBackend, "PIECE_BYTES", piece_rows * D * np.dtype(dtype).itemsize)
    monkeypatch.setattr(FlatBackend, "SCAN_BYTES", block_rows * 4 * D)
    monkeypatch.setattr(FlatBackend, "SCAN_THREADS", threads)
    weights = np.array([0.5, 0.0, -2.0])  # a dropped checkpoint and a negative weight
    vectors = rng.standard_normal((4, C, D)).astype(np.float32) * weights[None, :, None].astype(np.float32)
    prepared = PreparedQueries(vectors, weights, np.flatnonzero(weights))
    k = 9
    found = backend.candidates(prepared, k)
    rows = np.concatenate(parts).astype(np.float64)  # [N, C, D]
    exact = np.einsum("ncd,bcd->bn", rows, vectors.astype(np.float64))  # [B, N]
    for b in range(len(vectors)):  # the exact top k, and rows within the float32 error margin of the k-th only
        assert set(np.argsort(-exact[b])[:k]) <= set(found.proponent_rows[b]) - {-1}
        assert set(np.argsort(exact[b])[:k]) <= set(found.opponent_rows[b]) - {-1}
    assert found.proponent_rows.shape[1] <= k + 2 and found.opponent_rows.shape[1] <= k + 2
    np.testing.assert_allclose(found.mean_abs_score, np.abs(exact).mean(1), rtol=1e-5)
    np.testing.assert_allclose(found.max_abs_score, np.abs(exact).max(1), rtol=1e-5)
    # the pieces' scores are those of the resident (float32, in memory) scan
    resident = FlatBackend(backend.starts, backend.files, D, torch.device("cpu"), resident_bytes=1 << 30).candidates(
        prepared, k
    )
    np.testing.assert_array_equal(np.sort(found.proponent_rows, 1), np.sort(resident.proponent_rows, 1))
    np.testing.assert_array_equal(np.sort(found.opponent_rows, 1), np.sort(resident.opponent_rows, 1))
    backend.close()


@pytest.mark.parametrize(
    ("lo", "hi", "piece_rows", "threads"), [(0, 100, 7, 3), (5, 6, 4, 2), (10, 74, 64, 4), (3, 50, 1, 8)]
)
def test_runs_cut_a_block_into_whole_pieces_one_per_thread(lo, hi, piece_rows, threads):
    runs = _runs(lo, hi, piece_rows, threads)
    assert runs[0][0] == lo and runs[-1][1] == hi and len(runs) <= threads
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert all((a - lo) % piece_rows == 0 for a, _ in runs)  # every run starts on a piece boundary
    sizes = [-(-(z - a) // piece_rows) for a, z in runs]  # pieces per run, as even as possible
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("mapped", [True, False])
def test_a_failure_on_a_scan_thread_is_raised_after_every_thread_stopped(tmp_path, monkeypatch, mapped):
    """A failed read (files read with ``preadv`` where they cannot be mapped) or a failure scoring mapped pages on
    a scan thread reaches the caller, after every thread stopped."""
    rng = np.random.default_rng(4)
    backend = _backend(tmp_path, [rng.standard_normal((600, C, D)).astype("float16")], "float16")
    monkeypatch.setattr(FlatBackend, "PIECE_BYTES", 10 * D * 2)
    monkeypatch.setattr(FlatBackend, "SCAN_THREADS", 3)
    started: list[int] = []
    if mapped:
        score = search._cpu_scores

        def flaky_score(block, *args, **kwargs):
            started.append(threading.current_thread() is threading.main_thread())
            if not started[-1]:
                raise OSError("the disk went away")
            return score(block, *args, **kwargs)

        monkeypatch.setattr(search, "_cpu_scores", flaky_score)
    else:
        read = PartFile.read
        monkeypatch.setattr(PartFile, "mapped", lambda self: None)

        def flaky(self, lo, hi, buffer=None):
            started.append(lo == 0)
            if lo >= 400:
                raise OSError("the disk went away")
            return read(self, lo, hi, buffer)

        monkeypatch.setattr(PartFile, "read", flaky)
    weights = np.array([1.0, 1.0, 1.0])
    prepared = PreparedQueries(rng.standard_normal((1, C, D)).astype(np.float32), weights, np.arange(C))
    with pytest.raises(OSError, match="went away"):
        backend.candidates(prepared, 3)
    assert True in started  # the calling thread's run was scored too
    backend.close()


def test_a_part_file_cut_short_under_an_open_index_is_refused_not_a_crash(tmp_path):
    """A mapped file read past its end would kill the process (SIGBUS): a scan checks each file's size first."""
    rng = np.random.default_rng(6)
    backend = _backend(tmp_path, [rng.standard_normal((200, C, D)).astype("float16")], "float16")
    weights = np.array([1.0, 1.0, 1.0])
    prepared = PreparedQueries(rng.standard_normal((1, C, D)).astype(np.float32), weights, np.arange(C))
    backend.candidates(prepared, 3)  # mapped by the first scan
    part = backend.files[0][1]
    os.truncate(part.path, part.offset + 100 * part.row_bytes)
    with pytest.raises(IndexMismatchError, match="truncated"):
        backend.candidates(prepared, 3)
    backend.close()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("resident", [False, True])
def test_rows_the_float32_scan_cannot_tell_from_the_kth_are_all_candidates(tmp_path, monkeypatch, dtype, resident):
    """Adversarial near-ties: duplicates of the best (and worst) row straddle the k-th place, and rows that differ
    from them by one unit in the last place of one coordinate (exact scores apart by far less than float32
    resolves); under a negative weight. Every one is a candidate, so the float64 re-score ranks them (ties by
    id); rows far from the k-th are not."""
    monkeypatch.setattr(FlatBackend, "PIECE_BYTES", 16 * D * np.dtype(dtype).itemsize)
    monkeypatch.setattr(FlatBackend, "SCAN_BYTES", 40 * 4 * D)
    monkeypatch.setattr(FlatBackend, "SCAN_THREADS", 2)
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, C, D)).astype(dtype)
    weights = np.array([-1.5, 0.0, 0.75])
    vectors = rng.standard_normal((2, C, D)).astype(np.float32) * weights[None, :, None].astype(np.float32)
    exact = np.einsum("ncd,bcd->bn", rows.astype(np.float64), vectors.astype(np.float64))
    best, worst = int(np.argmax(exact[0])), int(np.argmin(exact[0]))
    near = []
    for at, source in [(17, best), (101, best), (202, best), (250, worst), (251, worst), (299, worst)]:
        rows[at] = rows[source]  # an exact tie
    for at, source in [(40, best), (140, best), (260, worst)]:
        rows[at] = rows[source]
        nudged = rows[at, 2, 5]
        rows[at, 2, 5] = np.nextafter(nudged, np.inf if nudged > 0 else -np.inf, dtype=rows.dtype)  # one ulp
        near.append(at)
    exact = np.einsum("ncd,bcd->bn", rows.astype(np.float64), vectors.astype(np.float64))
    backend = _backend(tmp_path, [rows[:130], rows[130:]], dtype)
    if resident:
        backend = FlatBackend(backend.starts, backend.files, D, torch.device("cpu"), resident_bytes=1 << 30)
    prepared = PreparedQueries(vectors, weights, np.flatnonzero(weights))
    k = 2  # the k-th place falls inside the group of equal and nearly equal rows
    found = backend.candidates(prepared, k)
    pro, opp = set(found.proponent_rows[0]) - {-1}, set(found.opponent_rows[0]) - {-1}
    assert {best, 17, 101, 202, 40, 140} <= pro and {worst, 250, 251, 299, 260} <= opp
    scores = exact[0]
    kth_pro, kth_opp = np.sort(scores)[-k], np.sort(scores)[k - 1]
    assert all(scores[r] > kth_pro - 1e-3 * abs(kth_pro) for r in pro)  # nothing far from the k-th
    assert all(scores[r] < kth_opp + 1e-3 * abs(kth_opp) for r in opp)
    for b in range(2):  # the second query: plain data, the exact top k among the candidates
        assert set(np.argsort(-exact[b])[:k]) <= set(found.proponent_rows[b])
        assert set(np.argsort(exact[b])[:k]) <= set(found.opponent_rows[b])
    backend.close()


def test_a_mass_of_tied_rows_is_cut_to_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(FlatBackend, "SCAN_BYTES", 16 * 4 * D)
    monkeypatch.setattr(_Within, "CAP", 8)
    rows = np.ones((100, C, D), dtype="float32")  # every score equal
    backend = _backend(tmp_path, [rows], "float32")
    weights = np.array([1.0, 1.0, 1.0])
    prepared = PreparedQueries(np.ones((1, C, D), dtype=np.float32), weights, np.arange(C))
    found = backend.candidates(prepared, 3)
    assert found.proponent_rows.shape == (1, 8) and (found.proponent_rows >= 0).all()
    assert found.opponent_rows.shape == (1, 8)
    backend.close()


def test_a_row_that_scores_nan_is_a_candidate_at_both_ends(tmp_path):
    """Bytes changed since load that read as NaN are handed to the re-score (which refuses them), not hidden."""
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((200, C, D)).astype("float32")
    rows[77, 1, 3] = np.nan
    backend = _backend(tmp_path, [rows], "float32")
    weights = np.array([1.0, 1.0, 1.0])
    prepared = PreparedQueries(rng.standard_normal((2, C, D)).astype(np.float32), weights, np.arange(C))
    found = backend.candidates(prepared, 3)
    assert all(77 in found.proponent_rows[b] and 77 in found.opponent_rows[b] for b in range(2))
    backend.close()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_norms_measured_ahead_bound_the_scan_as_a_first_scan_does(tmp_path, monkeypatch, mapped):
    """:meth:`FlatBackend.measure_norms` (what batch scoring runs before its passes) records the bounds a first scan
    records, so a scan after it proposes the same candidates, and :meth:`norm_bounds` reads them per row."""
    if not mapped:
        monkeypatch.setattr(PartFile, "mapped", lambda self: None)
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((n, C, D)).astype("float16") for n in (300, 133)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    scanned, ahead = _backend(tmp_path / "a", parts, "float16"), _backend(tmp_path / "b", parts, "float16")
    weights = np.array([0.5, 0.0, -2.0])
    prepared = PreparedQueries(rng.standard_normal((2, C, D)).astype(np.float32), weights, np.flatnonzero(weights))
    assert ahead.norm_bounds(0, 10, [0, 2]) is None  # nothing measured yet
    ahead.measure_norms([0, 2])
    first = scanned.candidates(prepared, 4)  # measures as it scans
    assert all(np.array_equal(a, b) for a, b in zip(scanned._norms[0], ahead._norms[0], strict=True))
    again = ahead.candidates(prepared, 4)
    for field in ("proponent_rows", "opponent_rows", "mean_abs_score", "max_abs_score"):
        assert np.array_equal(getattr(first, field), getattr(again, field)), field
    rows = np.concatenate(parts)[:, [0, 2]].astype(np.float32)
    bounds = ahead.norm_bounds(300, 433, [0, 2])
    assert bounds.shape == (133, 2) and (bounds >= np.linalg.norm(rows[300:], axis=2) * (1 - 1e-6)).all()
    scanned.close()
    ahead.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screened_blocks_propose_what_every_row_proposes(seed):
    """:class:`_Extremes` works out error bounds only for the rows its float32 screen keeps; its candidates are
    exactly those of feeding every row to both ends (ties, near-ties, a NaN row, +-inf and negative scores)."""
    rng = np.random.default_rng(seed)
    n, b, k = 700, 3, 5
    scores = rng.standard_normal((n, b)).astype(np.float32)
    scores[rng.integers(0, n, 40)] = scores[10]  # rows tied with one another
    scores[123, 1] = np.nan
    scores[321, 2] = np.inf
    scores[322, 0] = -np.inf
    scores[400] = np.nextafter(scores[10], np.float32(np.inf))  # a near-tie
    norms = np.abs(rng.standard_normal((n, 2))) * 1e3  # wide error bounds: many rows within the margin
    norms[555, 0] = np.nan
    query_norms = torch.from_numpy(np.abs(rng.standard_normal((2, b))))
    screened = search._Extremes(k, query_norms, D, torch.device("cpu"))
    every = [_Within(largest, k, b, torch.device("cpu")) for largest in (True, False)]
    for lo in range(0, n, 64):
        hi = min(lo + 64, n)
        block, bounds = torch.from_numpy(scores[lo:hi]), torch.from_numpy(norms[lo:hi])
        screened.add(block, bounds, lo)
        err = search._error_bound(bounds, query_norms, D, 2.0**-24)
        for end in every:
            end.add(block, err, lo)
    for found, reference in zip(screened.candidates(), (end.candidates() for end in every), strict=True):
        for j in range(b):
            assert set(found[j][found[j] >= 0]) == set(reference[j][reference[j] >= 0])
    assert 123 in screened.candidates()[0][1] and 555 in screened.candidates()[1][0]


def test_the_screen_drops_rows_that_cannot_reach_the_kth():
    """Past the first ``k`` rows, a block of rows far below the level gets no error bounds worked out at all."""
    extremes = search._Extremes(2, torch.ones((1, 1), dtype=torch.float64), D, torch.device("cpu"))
    extremes.add(torch.tensor([[10.0], [-10.0], [9.0], [-9.0]]), torch.ones((4, 1)), 0)
    calls = []
    real = search._error_bound
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search, "_error_bound", lambda *a: calls.append(a[0].shape) or real(*a))
        extremes.add(torch.zeros((1000, 1)), torch.ones((1000, 1)), 4)
    assert calls == [torch.Size([1, 1])]  # the block's one screening bound, no per-row bounds
    top, bottom = extremes.candidates()
    assert set(top[0]) == {0, 2} and set(bottom[0]) == {1, 3}


def test_numpy_blas_runs_on_one_thread_while_any_scan_runs(tmp_path, monkeypatch):
    """A scan's products run on the scan's own threads: numpy's BLAS is set to one thread while scans run (nested
    or concurrent ones share it) and given back its own setting when the last one ends."""
    from gradstore.store import blas

    libraries = blas._libraries()  # the BLAS libraries loaded when gradstore first scanned: numpy's among them
    if not libraries:
        pytest.skip("numpy's BLAS does not report its threads")
    before = [library.get_num_threads() for library in libraries]
    for library in libraries:
        library.set_num_threads(2)
    seen = []
    real = search._cpu_scores
    monkeypatch.setattr(
        search, "_cpu_scores", lambda *a, **kw: seen.append(libraries[0].get_num_threads()) or real(*a, **kw)
    )
    rng = np.random.default_rng(3)
    backend = _backend(tmp_path, [rng.standard_normal((50, C, D)).astype("float16")], "float16")
    prepared = PreparedQueries(rng.standard_normal((2, C, D)).astype(np.float32), np.ones(C), np.arange(C))
    try:
        with blas.scanning():
            backend.candidates(prepared, 3)  # nested: still one thread after it ends
            assert libraries[0].get_num_threads() == 1
        assert set(seen) == {1} and libraries[0].get_num_threads() == 2
    finally:
        for library, threads in zip(libraries, before, strict=True):
            library.set_num_threads(threads)
        backend.close()


def test_a_served_process_keeps_numpy_blas_on_one_thread(monkeypatch):
    """``Run.serving_threads`` (a process that serves queries on the CPU) sets torch and numpy's BLAS to one thread."""
    from types import SimpleNamespace

    from gradstore.server.run import Run
    from gradstore.store import blas

    libraries = blas._libraries()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads(), [library.get_num_threads() for library in libraries]
    try:
        for library in libraries:
            library.set_num_threads(2)
        assert Run.serving_threads(SimpleNamespace(query_device="cpu")) == 1  # type: ignore[arg-type]
        assert all(library.get_num_threads() == 1 for library in libraries)
    finally:
        torch.set_num_threads(before[0])
        for library, threads in zip(libraries, before[1], strict=True):
            library.set_num_threads(threads)
