"""Two gloo ranks (CPU) writing one store: an offline pass with rank-owned chunks and in-training capture.

``tests/helpers/dist_worker.py`` runs as two child processes (RANK 0/1, MASTER_ADDR=127.0.0.1, a free port; forked
with torch and gradstore imported: tests/helpers/preloaded.py). Both construct ``GradientLogger`` on the same store;
rank and world size come from torch.distributed.
The results are compared with a single-process ``log_checkpoint`` of the same model and examples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gradstore.logger import GradientLogger
from gradstore.store import GradientStore

from .helpers.crash_task import MLPTask, make_model
from .helpers.preloaded import spawn

HERE = Path(__file__).resolve().parent
WORKER = HERE / "helpers" / "dist_worker.py"
N, CHUNK, WORLD = 100, 8, 2
N_CHUNKS = -(-N // CHUNK)  # 13, the last one holding 4 rows


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        (np.linalg.norm(a.astype(np.float64) - b, axis=1) / np.linalg.norm(b.astype(np.float64), axis=1)).max()
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    store_path, out_dir = root / "shared.zarr", root / "out"
    out_dir.mkdir()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "OMP_NUM_THREADS": "1",
    }
    procs = [spawn(WORKER, str(store_path), str(out_dir), env={**env, "RANK": str(r)}, cwd=HERE) for r in range(WORLD)]

    # meanwhile, the single-process reference at the same weights
    task = MLPTask(N)
    reference_path = root / "reference.zarr"
    with GradientLogger(
        make_model(), task, store=reference_path, rank=4, chunk_rows=CHUNK, dtype="float32", progress=False
    ) as logger:
        assert (logger.process_rank, logger.world_size) == (0, 1)
        assert logger.log_checkpoint("pass", lr=0.1, batch_size=8) == N
    ref_ids, ref_grads = GradientStore.open(reference_path).read("pass")

    for r, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"rank {r} failed:\n{err}"
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return GradientStore.open(store_path), reports, ref_ids, ref_grads


def test_reference_is_complete(run):
    _, _, ref_ids, ref_grads = run
    np.testing.assert_array_equal(ref_ids, np.arange(N))
    assert ref_grads.shape == (N, 28) and (np.linalg.norm(ref_grads, axis=1) > 0).all()


def test_ranks_came_from_torch_distributed(run):
    _, reports, _, _ = run
    assert [(rep["rank"], rep["world"]) for rep in reports] == [(0, 2), (1, 2)]
    # rank 0 owns chunks 0,2,..,12 (6 full + the 4-row tail), rank 1 owns 1,3,..,11
    assert [rep["computed"] for rep in reports] == [52, 48]


@pytest.mark.parametrize("checkpoint", ["pass", "cap"])
def test_every_id_exactly_once_and_equal_to_single_process(run, checkpoint):
    store, _, ref_ids, ref_grads = run
    ids, grads = store.read(checkpoint)
    assert len(ids) == N == store.num_rows(checkpoint)
    np.testing.assert_array_equal(np.sort(ids), np.arange(N))  # all 100, none twice
    assert store.checkpoint_info(checkpoint).lr == 0.1
    error = _row_relative_error(grads, ref_grads[ids])
    assert error <= 1e-6, error
    # read(ids=...) gives the rows back in the requested order
    wanted = np.array([57, 3, 99, 0])
    got_ids, got = store.read(checkpoint, ids=wanted)
    np.testing.assert_array_equal(got_ids, wanted)
    assert _row_relative_error(got, ref_grads[wanted]) <= 1e-6


def test_pass_chunks_are_rank_owned(run):
    store, reports, _, ref_grads = run
    (segment,) = store.segments("pass")
    assert segment.name == "pass" and segment.capacity == N and segment.n_chunks == N_CHUNKS
    counts = segment.committed_counts()
    np.testing.assert_array_equal(counts, [CHUNK] * (N_CHUNKS - 1) + [N - (N_CHUNKS - 1) * CHUNK])
    for k in range(N_CHUNKS):  # chunk k holds exactly the examples at positions k*8 .. k*8+7
        np.testing.assert_array_equal(segment.chunk_ids(k), np.arange(k * CHUNK, min((k + 1) * CHUNK, N)))
    # the offline pass over positions is bit-identical to the single-process one (same batches of 8)
    _, grads = store.read("pass")
    np.testing.assert_array_equal(grads, ref_grads)
    # who wrote what: chunk k of the pass segment by rank k % 2, each exactly once
    writers: dict[int, list[int]] = {}
    for rep in reports:
        for w in rep["writes"]:
            if w["segment"] == "pass":
                writers.setdefault(w["chunk"], []).append(rep["rank"])
                np.testing.assert_array_equal(w["ids"], np.arange(w["chunk"] * CHUNK, min((w["chunk"] + 1) * CHUNK, N)))
    assert writers == {k: [k % WORLD] for k in range(N_CHUNKS)}


def test_capture_parts_are_rank_owned_and_disjoint(run):
    store, reports, _, _ = run
    segments = [p for p in store.segments("cap")]
    assert all(p.kind == "capture" for p in segments)
    ids_by_rank: dict[int, list[int]] = {0: [], 1: []}
    for segment in segments:
        assert segment.name.startswith(("capture-r0-", "capture-r1-")), segment.name
        owner = int(segment.name.split("-")[1][1:])
        for a, b in segment.row_ranges():
            ids_by_rank[owner] += np.asarray(segment.group["ids"][a:b]).tolist()
    assert {int(p.name.split("-")[1][1:]) for p in segments} == {0, 1}
    for rep in reports:
        split = rep["capture_ids"]
        assert len(split) == N // WORLD
        # the rank's segment holds exactly its shuffled split, in the order it was captured
        assert ids_by_rank[rep["rank"]] == split
    assert not set(ids_by_rank[0]) & set(ids_by_rank[1])
    assert sorted(ids_by_rank[0] + ids_by_rank[1]) == list(range(N))
    # the split really was shuffled (not positions 0..49 / 50..99)
    assert sorted(reports[0]["capture_ids"]) != list(range(N // 2))

    # no (segment, chunk) was written by two ranks, or twice; capture segments only by their owner
    written = [(w["segment"], w["chunk"], rep["rank"]) for rep in reports for w in rep["writes"]]
    assert len({(p, c) for p, c, _ in written}) == len(written)
    for part_name, _, rank in written:
        if part_name != "pass":
            assert part_name.startswith(f"capture-r{rank}-")
    # 50 rows per rank in chunks of 8: 6 full chunks and a 2-row tail committed at close()
    for rep in reports:
        chunks = [w for w in rep["writes"] if w["segment"] != "pass"]
        assert [len(w["ids"]) for w in chunks] == [8] * 6 + [2]
