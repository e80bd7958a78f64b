"""The files around a run: weights checksums of capture runs (recorded, checked on every load), re-indexing a
capture-logged run (the demo), the index lock, and the store fingerprint read straight from the commit records."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from gradstore.demos.digits import DigitsTask
from gradstore.logger import GradientLogger
from gradstore.server.cli import main
from gradstore.server.run import open_engine, open_index
from gradstore.server.run import weights as weights_module
from gradstore.server.run.config import RunConfig
from gradstore.server.run.engine import QueryEngine
from gradstore.store import (
    CheckpointMismatchError,
    GradientIndex,
    GradientStore,
    StoreLockedError,
    default_index_path,
    file_sha256,
    index_lock,
    lock_path,
)

QUERY = {"test_index": 3}


def _answers(engine: QueryEngine) -> list[tuple[int, float]]:
    (result,) = engine.influence([QUERY], top_k=5).results
    return [(item.id, item.score) for item in result.proponents + result.opponents]


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def demo(demo_config, tmp_path) -> Path:
    """A copy of the prepared demo run (trained with capture(), indexed); returns its run.toml."""
    shutil.copytree(demo_config.parent, tmp_path / "demo")
    return tmp_path / "demo" / "run.toml"


def _forget_weights(store_path: Path) -> None:
    """Make the store look like one captured by an older gradstore: no weights path or sha256 recorded."""
    for meta in (store_path / "checkpoints").glob("*/zarr.json"):
        data = json.loads(meta.read_text())
        data["attributes"].update(weights_path=None, weights_sha256=None)
        meta.write_text(json.dumps(data))


# -- capture runs record their weights ---------------------------------------------------------------------------


def test_the_demo_records_each_checkpoints_weights_sha256(demo):
    config = RunConfig.load(demo)
    store = GradientStore.open(config.store.path)
    for checkpoint in config.checkpoints:
        info = store.checkpoint_info(checkpoint.name)
        assert store.logged_by_capture(checkpoint.name)
        assert Path(info.weights_path).name == checkpoint.path.name
        assert info.weights_sha256 == hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()


def test_reindexing_the_demo_gives_the_demos_answers(demo, capsys):
    """`gradstore index` on a capture-logged run logs nothing again (its rows were taken at each step's weights)
    and rebuilds the index; a store captured without weights checksums gets them recorded."""
    config = RunConfig.load(demo)
    before = _answers(open_engine(config, device="cpu"))
    rows = {c.name: GradientStore.open(config.store.path).read(c.name) for c in config.checkpoints}
    _forget_weights(config.store.path)
    shutil.rmtree(default_index_path(config.store.path))
    assert _cli(capsys, "index", "--config", demo, "--quiet") == (0, "")
    store = GradientStore.open(config.store.path)
    for checkpoint in config.checkpoints:
        ids, grads = store.read(checkpoint.name)
        np.testing.assert_array_equal(ids, rows[checkpoint.name][0])
        np.testing.assert_array_equal(grads, rows[checkpoint.name][1])  # not re-logged: the captured rows
        assert store.checkpoint_info(checkpoint.name).weights_sha256 == file_sha256(checkpoint.path)
        assert not [s for s in store.segments(checkpoint.name) if s.kind == "pass"]
    assert _answers(open_engine(config, device="cpu")) == before


def test_reindexing_a_capture_run_refuses_other_weights_or_lr(demo, capsys):
    config = RunConfig.load(demo)
    weights = config.checkpoints[1].path
    original = weights.read_bytes()
    torch.save(DigitsTask().build_model().state_dict(), weights)  # initial weights, not epoch-1's
    code, err = _cli(capsys, "index", "--config", demo, "--quiet")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"error: weights file {weights} differs from the weights checkpoint 'epoch-1' was captured with" in err
    weights.write_bytes(original)
    demo.write_text(demo.read_text().replace("lr = 0.1\n", "lr = 0.3\n"))
    code, err = _cli(capsys, "index", "--config", demo, "--quiet")
    assert code == 2
    assert "checkpoint 'epoch-1' was captured during training with lr=0.1, the config gives lr=0.3" in err


def test_capture_records_the_weights_given_and_keeps_them_on_resume(tmp_path):
    task = DigitsTask(n_train=64, hidden=16)
    model = task.build_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    examples = task.train_examples()

    for session in range(2):  # the second session resumes without naming the weights again
        with GradientLogger(model, task, store=tmp_path / "s.zarr", rank=2, chunk_rows=16, progress=False) as logger:
            lo = 32 * session
            batch = task.collate(examples[lo : lo + 32])
            given = tmp_path / "w.pt" if session == 0 else None
            with logger.capture("c", lr=0.1, ids=np.arange(lo, lo + 32), weights_path=given):
                task.loss(model, batch).mean().backward()
    info = GradientStore.open(tmp_path / "s.zarr").checkpoint_info("c")
    assert info.weights_path == str((tmp_path / "w.pt").resolve())
    assert info.weights_sha256 == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert GradientStore.open(tmp_path / "s.zarr").num_rows("c") == 64


# -- the engine checks weights on every load ---------------------------------------------------------------------


def test_weights_changed_under_a_running_engine_are_refused(demo, monkeypatch):
    """residency='one' re-reads each checkpoint's weights per query: an unchanged file costs a stat (no hash), a
    changed one is a CheckpointMismatchError, and restoring it restores the answers."""
    config = RunConfig.load(demo)
    store = GradientStore.open(config.store.path)
    paths = {c.name: c.path for c in config.checkpoints}
    engine = QueryEngine(config.make_task(), store, open_index(config, store), paths, residency="one", device="cpu")
    before = _answers(engine)
    hashed = []
    monkeypatch.setattr(weights_module, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    assert _answers(engine) == before and hashed == []  # four loads, no hash
    weights = paths["epoch-2"]
    original = weights.read_bytes()
    torch.save(DigitsTask().build_model().state_dict(), weights)
    with pytest.raises(CheckpointMismatchError, match=f"weights file {weights} of checkpoint 'epoch-2' differs"):
        engine.influence([QUERY], top_k=5)
    weights.write_bytes(original)
    assert _answers(engine) == before and hashed == [weights, weights]


def test_weights_of_a_run_without_checksums_are_checked_against_the_loaded_ones(demo):
    config = RunConfig.load(demo)
    _forget_weights(config.store.path)
    shutil.rmtree(default_index_path(config.store.path))
    store = GradientStore.open(config.store.path)
    GradientIndex.build(store, config.index, path=config.index_path, progress=False)
    paths = {c.name: c.path for c in config.checkpoints}
    engine = QueryEngine(config.make_task(), store, open_index(config, store), paths, residency="one", device="cpu")
    _answers(engine)
    torch.save(DigitsTask().build_model().state_dict(), paths["epoch-2"])  # the initial weights, not these
    with pytest.raises(CheckpointMismatchError, match="differs from the one loaded when the engine started"):
        _answers(engine)


# -- one `gradstore index` per store ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from gradstore.store import index_lock
with index_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(store: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _small_run(directory: Path) -> Path:
    torch.save(DigitsTask(n_train=32, hidden=16).build_model().state_dict(), directory / "c0.pt")
    config = directory / "run.toml"
    config.write_text(
        '[task]\nobject = "gradstore.demos.digits:DigitsTask"\nargs = { n_train = 32, hidden = 16 }\n'
        '[projection]\nrank = [2, 2]\n[store]\npath = "run.zarr"\nchunk_rows = 8\n'
        '[[checkpoints]]\nname = "c0"\npath = "c0.pt"\nlr = 0.1\n'
    )
    return config


def test_a_second_index_job_is_refused_naming_the_holder_until_it_dies(tmp_path, capsys):
    config = _small_run(tmp_path)
    store = tmp_path / "run.zarr"
    holder = _hold(store, 60)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            with index_lock(store, wait_s=0.5):
                pass
        assert time.monotonic() - started >= 0.5
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in message and "(waited 0.5 s)" in message
        code, err = _cli(capsys, "index", "--config", config, "--quiet")
        assert code == 2 and len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "--wait" in err
        assert not store.exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is taken over at once (the file still names it)
    assert str(holder.pid) in lock_path(store).read_text()
    assert _cli(capsys, "index", "--config", config, "--quiet") == (0, "")
    assert GradientStore.open(store).num_rows("c0") == 32


def test_a_second_index_job_waits_for_the_first(tmp_path, capsys):
    config = _small_run(tmp_path)
    holder = _hold(tmp_path / "run.zarr", 1.0)
    started = time.monotonic()
    try:
        assert _cli(capsys, "index", "--config", config, "--quiet", "--wait", "30") == (0, "")
    finally:
        holder.wait()
    assert time.monotonic() - started >= 0.5 and holder.returncode == 0
    assert json.loads(lock_path(tmp_path / "run.zarr").read_text() or "{}") == {}  # released


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    store = tmp_path / "run.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": time.time() - 3600}
    lock_path(store).write_text(json.dumps(record))
    with index_lock(store):
        assert json.loads(lock_path(store).read_text())["pid"] == os.getpid()


# -- the store fingerprint -----------------------------------------------------------------------------------------


def _zarr_fingerprint(store: GradientStore) -> str:
    """The fingerprint as the store computed it before commit records were read straight from their files."""
    root = zarr.open_group(str(store.path), mode="r")
    digest = hashlib.sha256(json.dumps(dict(root.attrs), sort_keys=True).encode())
    for name in store.checkpoints:
        group = root[f"checkpoints/{name}"]
        digest.update(json.dumps(dict(group.attrs), sort_keys=True).encode())
        for segment_name, segment in sorted(group.groups()):
            digest.update(segment_name.encode())
            digest.update(np.asarray(segment["committed"][:], dtype=np.int64).tobytes())
            digest.update(np.asarray(segment.attrs.get("skipped_ids", []), dtype=np.int64).tobytes())
    return digest.hexdigest()


def test_fingerprint_equals_the_zarr_read_one_and_follows_commits(demo, tmp_path):
    """Indexes built before keep matching (the same value), and every commit changes it."""
    config = RunConfig.load(demo)
    store = GradientStore.open(config.store.path)
    assert store.fingerprint() == _zarr_fingerprint(store)
    for segment in store.segments("epoch-0"):
        np.testing.assert_array_equal(segment.committed_counts(), np.asarray(segment.group["committed"][:]))
    before = store.fingerprint()
    writable = GradientStore.open(config.store.path, mode="a")
    segment = writable.new_capture_segment("epoch-0", "extra")
    assert writable.fingerprint() != before  # a new (empty) segment
    middle = writable.fingerprint()
    segment.write_chunk(0, np.array([10_000]), np.zeros((1, store.dim), dtype=store.dtype))
    assert writable.fingerprint() not in (before, middle)
    assert writable.fingerprint() == _zarr_fingerprint(writable)
