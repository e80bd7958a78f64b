"""Stores and indexes at ``s3://`` URLs, against a moto S3 server on loopback (store/remote.py).

One moto S3 server (threaded, in this process) serves the module; child processes (forked with torch and gradstore
imported: tests/helpers/preloaded.py) reach it through ``AWS_ENDPOINT_URL``. Every remote result is compared with the
same work done on a local store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="object-storage tests need s3fs (pip install -e .[dev] installs it)")
moto_server = pytest.importorskip("moto.server", reason="object-storage tests need moto[server] (in the dev extra)")

from werkzeug.serving import make_server  # noqa: E402  (moto[server]'s web server)

from gradstore.logger import GradientLogger  # noqa: E402
from gradstore.store import (  # noqa: E402
    GradientIndex,
    GradientStore,
    IndexOptions,
    RemotePath,
    StoreExistsError,
    StoreLockedError,
    index_lock,
)
from gradstore.store.remote import fetch_index, local_index_dir  # noqa: E402

from .helpers.crash_task import MLPTask, make_model  # noqa: E402
from .helpers.preloaded import Child, spawn  # noqa: E402

HERE = Path(__file__).resolve().parent
BUCKET = "gradstore-test"
N, CHUNK = 200, 16


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The endpoint of a fresh moto S3 server with bucket ``BUCKET``; AWS_* and the index cache set for the module."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    # moto's S3 app alone (as `moto_server s3` serves it), not ThreadedMotoServer's dispatcher, which looks the service
    # up again for every request (a directory listing and hundreds of regular expressions): half of each request's time
    app, lock = moto_server.create_backend_app("s3"), threading.Lock()

    def serialized(environ, start_response):  # one request at a time, as moto's backends expect (not thread-safe)
        with lock:
            response = app(environ, start_response)
            try:
                return [b"".join(response)]
            finally:
                if hasattr(response, "close"):
                    response.close()

    server = make_server("127.0.0.1", 0, serialized, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "GRADSTORE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        RemotePath(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.shutdown()
        thread.join()


def _log(store, n: int = N) -> GradientStore:
    with GradientLogger(
        make_model(), MLPTask(n), store=store, rank=4, chunk_rows=CHUNK, dtype="float32", progress=False
    ) as logger:
        assert logger.log_checkpoint("c0", lr=0.1, batch_size=8) == n
        assert logger.store is not None
        return logger.store


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> GradientStore:
    return _log(tmp_path_factory.mktemp("local") / "run.zarr")


@pytest.fixture(scope="module")
def remote_store(s3) -> GradientStore:
    return _log(f"s3://{BUCKET}/run.zarr")


def test_logging_to_s3_equals_local(s3, remote_store, local_store):
    url = f"s3://{BUCKET}/run.zarr"
    store = GradientStore.open(url)
    assert isinstance(store.path, RemotePath) and str(store.path) == url
    ids, grads = store.read("c0")
    ref_ids, ref_grads = local_store.read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(grads, ref_grads)  # exact: the same float32 bytes
    assert store.checkpoint_info("c0") == local_store.checkpoint_info("c0")
    assert store.verify() == []
    # the objects are where a local store keeps its files, commit records included
    objects = set(store.path.files())
    local_files = {str(p.relative_to(local_store.path)) for p in Path(local_store.path).rglob("*") if p.is_file()}
    assert objects == local_files
    assert "checkpoints/c0/pass/committed/c/12" in objects
    # a second create is refused; an existing store opens
    with pytest.raises(StoreExistsError, match="already exists"):
        GradientStore.create(url, store.spec)


def test_create_is_committed_by_the_root_object_last(s3, local_store):
    """A create killed before its commit leaves only checkpoints/zarr.json: no store, and the next create works."""
    url = RemotePath(f"s3://{BUCKET}/half.zarr")
    (url / "checkpoints" / "zarr.json").write_bytes(b"{}")  # what a killed create leaves
    with pytest.raises(Exception, match="no gradient store"):
        GradientStore.open(url)
    store = GradientStore.create(url, local_store.spec)
    assert store.checkpoints == [] and sorted(url.files()) == ["checkpoints/zarr.json", "zarr.json"]
    other = RemotePath(f"s3://{BUCKET}/junk.zarr")
    (other / "notes.txt").write_bytes(b"x")
    with pytest.raises(StoreExistsError, match="no gradient store"):
        GradientStore.create(other, local_store.spec)


def _spawn(env: dict[str, str], store: str, *args: str) -> Child:
    environment = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    return spawn(HERE / "helpers" / "crash_worker.py", store, *args, env=environment, cwd=HERE / "helpers")


@pytest.mark.slow
def test_crash_resume_on_s3(s3, local_store):
    """SIGKILL inside chunk 5's write (its data objects written, its commit not): chunks 0..4 served, 5 is not;
    the resume computes only the rest and the rows equal an uninterrupted run."""
    url = f"s3://{BUCKET}/crash.zarr"
    proc = _spawn(s3, url, "write", "5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    store = GradientStore.open(url)
    (segment,) = store.segments("c0")
    counts = segment.committed_counts()
    np.testing.assert_array_equal(counts, [CHUNK] * 5 + [0] * 8)
    raw_ids = np.asarray(segment.group["ids"][:])
    np.testing.assert_array_equal(raw_ids[5 * CHUNK : 6 * CHUNK], np.arange(5 * CHUNK, 6 * CHUNK))  # written ...
    ids, grads = store.read("c0")
    np.testing.assert_array_equal(ids, np.arange(5 * CHUNK))  # ... and yet not served
    ref_ids, ref_grads = local_store.read("c0")
    np.testing.assert_array_equal(grads, ref_grads[: 5 * CHUNK])

    proc = _spawn(s3, url, "none")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["computed"] == N - 5 * CHUNK
    ids, grads = GradientStore.open(url).read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(grads, ref_grads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_write_one_s3_store(s3, tmp_path):
    """Two gloo ranks (tests/helpers/dist_worker.py) log a pass (rank-owned chunks) and capture into one store."""
    url = f"s3://{BUCKET}/dist.zarr"
    env = {**os.environ, **s3, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    worker = HERE / "helpers" / "dist_worker.py"
    procs = [spawn(worker, url, str(tmp_path), env={**env, "RANK": str(r)}, cwd=HERE / "helpers") for r in range(2)]
    local = tmp_path / "single.zarr"  # meanwhile, the single-process reference
    with GradientLogger(
        make_model(), MLPTask(100), store=local, rank=4, chunk_rows=8, dtype="float32", progress=False
    ) as single:
        single.log_checkpoint("pass", lr=0.1, batch_size=8)
    for r, proc in enumerate(procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"rank {r}: {err}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [rep["computed"] for rep in reports] == [52, 48]  # 13 chunks of 8: rank 0 owns 7, rank 1 owns 6
    store = GradientStore.open(url)
    ids, grads = store.read("pass")
    np.testing.assert_array_equal(ids, np.arange(100))
    np.testing.assert_array_equal(grads, GradientStore.open(local).read("pass")[1])
    cap_ids, _ = store.read("cap")
    np.testing.assert_array_equal(np.sort(cap_ids), np.arange(100))
    segments = [s.name for s in store.segments("cap")]
    assert sum(name.startswith("capture-r0-") for name in segments) == 1
    assert sum(name.startswith("capture-r1-") for name in segments) == 1


@pytest.mark.slow
def test_index_and_query_from_s3_equal_local(s3, remote_store, local_store, tmp_path):
    options = IndexOptions(kind="flat", preconditioner="identity")
    local_index = GradientIndex.build(local_store, options, path=tmp_path / "local.index", progress=False)
    store = GradientStore.open(f"s3://{BUCKET}/run.zarr")
    remote_index = GradientIndex.build(store, options, progress=False)  # default: run.index beside the store
    url = RemotePath(f"s3://{BUCKET}/run.index")
    assert "manifest.json" in url.files()
    cached = local_index_dir(url)
    assert cached.parent == Path(os.environ["GRADSTORE_CACHE_DIR"]) / "index"
    assert (
        remote_index.path == cached and (cached / "manifest.json").read_bytes() == (url / "manifest.json").read_bytes()
    )

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((3, 1, store.dim)).astype(np.float32)
    opened = GradientIndex.open(None, GradientStore.open(f"s3://{BUCKET}/run.zarr"))
    want = local_index.search(queries, [1.0], k=5)
    got = opened.search(queries, [1.0], k=5)
    np.testing.assert_array_equal(opened.ids[got.proponent_rows], local_index.ids[want.proponent_rows])
    np.testing.assert_array_equal(got.proponent_scores, want.proponent_scores)
    np.testing.assert_array_equal(opened.ids[got.opponent_rows], local_index.ids[want.opponent_rows])

    # a damaged cached file is re-validated against the manifest checksums and downloaded again
    victim = next(p for p in sorted(cached.iterdir()) if p.name == "ids.npy")
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    assert fetch_index(url) == cached
    assert victim.read_bytes() == (url / "ids.npy").read_bytes()


def test_index_lock_on_s3(s3):
    url = f"s3://{BUCKET}/locked.zarr"
    with index_lock(url) as held:
        assert isinstance(held, RemotePath) and held.name == ".locked.zarr.index.lock"
        info = json.loads(held.read_bytes())
        assert info["pid"] == os.getpid()
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            with index_lock(url, wait_s=0.2):
                pass
    assert not held.exists()  # released
    # a lock left by a dead process on this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held.write_bytes(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}).encode())
    with index_lock(url) as again:
        assert json.loads(again.read_bytes())["pid"] == os.getpid()


@pytest.mark.slow
def test_cli_index_and_query_with_an_s3_store(s3, tmp_path, capsys):
    """``[store] path = "s3://..."`` in run.toml: `gradstore index` logs and indexes remotely, `gradstore query`
    answers exactly as the same run with a local store."""
    from gradstore.server import cli
    from gradstore.server.run.config import RunConfig

    from .test_cli import TIMING_KEYS, save_checkpoints, write_config

    answers = {}
    for where in ("local", "s3"):
        directory = tmp_path / where
        directory.mkdir()
        if where == "local":
            save_checkpoints(directory)
        else:
            for name in ("epoch-0.pt", "epoch-1.pt"):
                shutil.copyfile(tmp_path / "local" / name, directory / name)
        config = write_config(directory)
        if where == "s3":
            config.write_text(config.read_text().replace('path = "run.zarr"', f'path = "s3://{BUCKET}/cli.zarr"'))
            assert str(RunConfig.load(config).store.path) == f"s3://{BUCKET}/cli.zarr"  # not resolved as a file
        cli.main(["index", "--config", str(config), "--quiet"])
        assert "indexed 200 examples x 2 checkpoints" in capsys.readouterr().out
        cli.main(["query", "--config", str(config), "--query", '{"test_index": 3}', "--top-k", "4", "--json"])
        answers[where] = {k: v for k, v in json.loads(capsys.readouterr().out).items() if k not in TIMING_KEYS}
    assert RemotePath(f"s3://{BUCKET}/cli.index/manifest.json").is_file()
    assert not (tmp_path / "s3" / "run.zarr").exists()
    assert answers["s3"] == answers["local"]
    assert len(answers["s3"]["results"][0]["proponents"]) == 4
