"""SIGKILL safety: a logger killed mid-pass leaves a store that serves only complete rows and resumes exactly.

Each scenario runs ``tests/helpers/crash_worker.py`` in a child process (forked with torch and gradstore imported
already: tests/helpers/preloaded.py) that logs checkpoint "c0" of the tiny MLP task (200 examples, chunk_rows=16,
float32) and kills itself with SIGKILL at a chosen moment:

* ``loss``: inside the 12th call of ``Task.loss`` (88 rows computed, chunk 5 half filled, the
  background writer possibly still busy with earlier chunks);
* ``write``: inside ``Segment.write_chunk`` for chunk K, after chunk K's grads and ids are on disk and
  before its commit record is written.

The store is then reopened, checked against an uninterrupted reference run, and resumed by a
second child with the same arguments.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import GradientStore, UnknownExampleError

from .helpers.preloaded import Child, spawn

HERE = Path(__file__).resolve().parent
WORKER = HERE / "helpers" / "crash_worker.py"
N, CHUNK = 200, 16

SCENARIOS = {
    "loss-call-12": ("loss", "12"),  # mid-chunk: rows 80..87 are buffered, never written
    "write-chunk-5": ("write", "5"),  # chunk 5 data written, commit missing
    "write-last-chunk": ("write", "12"),  # the final, partial chunk (rows 192..199)
}


def _spawn(store: Path, *args: str) -> Child:
    return spawn(WORKER, str(store), *args, cwd=HERE)


def _finish(proc: Child, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@dataclass
class Killed:
    """What a killed run left behind, captured before it was resumed, and what the resume reported."""

    returncode: int
    stdout: str
    stderr: str
    counts: np.ndarray
    ids: np.ndarray
    grads: np.ndarray
    raw_ids: np.ndarray  # the segment's ids array as stored, committed or not
    raw_grads: np.ndarray
    probe_id: int  # the first id the killed run did not commit
    probe_error: Exception | None  # what reading it raised
    resume_rc: int = 0
    resume_out: str = ""
    resume_err: str = ""
    resumed_ids: np.ndarray | None = None
    resumed_grads: np.ndarray | None = None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1: the reference run and every killed run, concurrently. Phase 2: every resume, concurrently."""
    root = tmp_path_factory.mktemp("crash")
    reference = root / "reference.zarr"
    procs = {"reference": _spawn(reference, "none")}
    for name, args in SCENARIOS.items():
        procs[name] = _spawn(root / f"{name}.zarr", *args)
    finished = {name: _finish(proc) for name, proc in procs.items()}

    rc, out, err = finished["reference"]
    assert rc == 0, err
    # one loss call per batch of 8, plus one for the first batch's exactness check
    assert json.loads(out) == {"computed": N, "loss_calls": N // 8 + 1}
    ref_ids, ref_grads = GradientStore.open(reference).read("c0")

    killed: dict[str, Killed] = {}
    for name in SCENARIOS:
        rc, out, err = finished[name]
        store = GradientStore.open(root / f"{name}.zarr")
        segments = store.segments("c0")
        assert [p.name for p in segments] == ["pass"], f"{name}: {err}"
        ids, grads = store.read("c0")
        probe = min(set(range(N)) - set(ids.tolist()))
        try:
            store.read("c0", ids=[probe])
            probe_error = None
        except Exception as exc:
            probe_error = exc
        killed[name] = Killed(
            rc,
            out,
            err,
            segments[0].committed_counts(),
            ids,
            grads,
            np.asarray(segments[0].group["ids"][:]),
            np.asarray(segments[0].group["grads"][:]),
            probe,
            probe_error,
        )

    # phase 2: resume every killed store, and re-run the complete reference store (nothing to do)
    procs = {name: _spawn(root / f"{name}.zarr", "none") for name in SCENARIOS}
    procs["reference"] = _spawn(reference, "none")
    finished = {name: _finish(proc) for name, proc in procs.items()}
    for name in SCENARIOS:
        k = killed[name]
        k.resume_rc, k.resume_out, k.resume_err = finished[name]
        k.resumed_ids, k.resumed_grads = GradientStore.open(root / f"{name}.zarr").read("c0")
    return ref_ids, ref_grads, killed, finished["reference"], reference


def test_reference_run_is_complete_and_rerun_computes_nothing(runs):
    ref_ids, ref_grads, _, (rc, out, err), reference = runs
    np.testing.assert_array_equal(ref_ids, np.arange(N))
    assert ref_grads.dtype == np.float32 and ref_grads.shape == (N, 28)
    assert np.isfinite(ref_grads).all() and (np.linalg.norm(ref_grads, axis=1) > 0).all()
    assert rc == 0, err
    assert json.loads(out) == {"computed": 0, "loss_calls": 0}
    ids, grads = GradientStore.open(reference).read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(grads, ref_grads)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_run_serves_only_complete_rows(runs, scenario):
    ref_ids, ref_grads, killed, _, _ = runs
    k = killed[scenario]
    assert k.returncode == -signal.SIGKILL, f"child did not die by SIGKILL (rc={k.returncode}): {k.stderr}"
    assert k.stdout == ""  # it never reached the end

    counts, ids, grads = k.counts, k.ids, k.grads
    committed_rows = int(counts.sum())
    assert len(ids) == committed_rows
    assert 0 < committed_rows < N
    assert len(np.unique(ids)) == len(ids)
    assert set(ids.tolist()) < set(range(N))  # a strict subset
    assert grads.dtype == np.float32
    np.testing.assert_array_equal(grads, ref_grads[ids])  # every served row exactly equals the reference row
    # committed chunks are whole: chunk k serves exactly rows k*16 .. min(k*16+16, N)
    for chunk in np.flatnonzero(counts):
        assert counts[chunk] == min(CHUNK, N - chunk * CHUNK)
    expected = np.concatenate([np.arange(c * CHUNK, c * CHUNK + counts[c]) for c in np.flatnonzero(counts)])
    np.testing.assert_array_equal(ids, expected)

    mode, arg = SCENARIOS[scenario]
    if mode == "write":
        kill_chunk = int(arg)
        # chunks are written in order by one thread: everything before K is committed, nothing after
        assert committed_rows == kill_chunk * CHUNK
        assert counts[kill_chunk] == 0
        lo, hi = kill_chunk * CHUNK, min((kill_chunk + 1) * CHUNK, N)
        # the data of chunk K really is on disk ... and yet it is not served
        np.testing.assert_array_equal(k.raw_ids[lo:hi], np.arange(lo, hi))
        np.testing.assert_array_equal(k.raw_grads[lo:hi], ref_grads[lo:hi])
        assert not set(range(lo, hi)) & set(ids.tolist())
    else:
        # killed in the 12th loss call: 11 batches of 8 = 88 rows computed, so at most chunks 0..4 are
        # committed; the bounded writer queue (at most 4 pending writes) guarantees chunk 0 is
        assert CHUNK <= committed_rows <= 5 * CHUNK
        assert counts[5:].sum() == 0
        assert (k.raw_ids[5 * CHUNK :] == -1).all()  # the half-filled chunk 5 never reached the store
    # the first uncommitted row (computed by the killed run, maybe even written) is refused by id
    assert k.probe_id == committed_rows
    assert isinstance(k.probe_error, UnknownExampleError), k.probe_error
    assert f"no committed row for ids [{k.probe_id}]" in str(k.probe_error)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_computes_only_missing_rows_and_matches_reference(runs, scenario):
    ref_ids, ref_grads, killed, _, _ = runs
    k = killed[scenario]
    assert k.resume_rc == 0, k.resume_err
    committed_rows = int(k.counts.sum())
    report = json.loads(k.resume_out)
    assert report["computed"] == N - committed_rows
    batches = -(-(N - committed_rows) // 8)
    assert report["loss_calls"] == batches + (batches > 0)  # + the first batch's exactness check

    # identical to the uninterrupted run, ids and grads, in the order read returns them
    np.testing.assert_array_equal(k.resumed_ids, ref_ids)
    np.testing.assert_array_equal(k.resumed_grads, ref_grads)
    # rows committed before the crash were kept (and equal what was served before)
    np.testing.assert_array_equal(k.resumed_grads[k.ids], k.grads)


def test_kill_during_store_creation_leaves_no_store_and_the_next_run_cleans_up(tmp_path, runs):
    """Creation is built aside and renamed: a kill leaves only a hidden scratch directory, removed by the next run."""
    ref_ids, ref_grads, *_ = runs
    store = tmp_path / "new.zarr"
    rc, _, err = _finish(_spawn(store, "create"))
    assert rc == -signal.SIGKILL, err
    assert not store.exists()
    (scratch,) = tmp_path.glob(".new.zarr.creating-*")
    rc, _, err = _finish(_spawn(store, "none"))
    assert rc == 0, err
    assert not scratch.exists() and not list(tmp_path.glob(".new.zarr.creating-*"))
    ids, grads = GradientStore.open(store).read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(grads, ref_grads)


def test_store_killed_before_its_checkpoints_group_reopens(tmp_path, runs):
    """A store of an older gradstore, killed between its root metadata and its checkpoints group, is usable."""
    import shutil

    ref_ids, ref_grads, *_, reference = runs
    store = tmp_path / "old.zarr"
    shutil.copytree(reference, store)
    shutil.rmtree(store / "checkpoints")
    assert GradientStore.open(store).checkpoints == []
    rc, _, err = _finish(_spawn(store, "none"))
    assert rc == 0, err
    ids, grads = GradientStore.open(store).read("c0")
    np.testing.assert_array_equal(grads, ref_grads)
