"""SIGKILL at each point of the README's resumable training loop loses no captured row.

The loop flushes the logger right before it saves its training state. Killed anywhere and resumed from that state,
every example of every epoch ends up in the store with the row an uninterrupted run wrote.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import GradientStore
from tests.helpers.preloaded import spawn

HERE = Path(__file__).resolve().parent
WORKER = HERE / "helpers" / "capture_loop_worker.py"
N = 200


def _run(run: Path, *args: str, env: dict | None = None) -> int:
    """``python capture_loop_worker.py run *args``, forked with its imports done (:mod:`tests.helpers.preloaded`)."""
    proc = spawn(WORKER, str(run), *args, env={**os.environ, **(env or {})}, cwd=HERE)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    assert _run(run) == 0
    store = GradientStore.open(run / "store.zarr")
    return {c: store.read(c, ids=np.arange(N))[1] for c in store.checkpoints}


# global step = epoch * 1000 + batch; saves after batches 2, 5, 8, ... (SAVE_EVERY = 3); 25 batches per epoch
KILLS = [("captured", 4), ("flushed", 5), ("saved", 5), ("captured", 1024), ("saved", 1023)]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "step"), KILLS, ids=[f"{p}-{s}" for p, s in KILLS])
def test_kill_and_resume_loses_no_row(tmp_path, reference, point, step):
    assert _run(tmp_path, point, str(step)) == -signal.SIGKILL
    assert _run(tmp_path) == 0  # resume from the saved training state and finish
    store = GradientStore.open(tmp_path / "store.zarr")
    assert store.checkpoints == list(reference)
    for checkpoint, rows in reference.items():
        ids = store.committed_ids(checkpoint)
        assert sorted(ids.tolist()) == list(range(N)), f"{checkpoint}: {N - len(set(ids.tolist()))} rows lost"
        np.testing.assert_allclose(store.read(checkpoint, ids=np.arange(N))[1], rows, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_without_the_flush_a_kill_after_saving_loses_rows(tmp_path, reference):
    """The same kill in the loop without ``logger.flush()`` before the save: the open chunk's rows are gone."""
    assert _run(tmp_path, "saved", "5", env={"NO_FLUSH": "1"}) == -signal.SIGKILL
    assert _run(tmp_path, env={"NO_FLUSH": "1"}) == 0
    ids = GradientStore.open(tmp_path / "store.zarr").committed_ids("epoch-0")
    assert 0 < N - len(set(ids.tolist())) <= 48  # rows of steps 0..5 that sat in the open chunk
