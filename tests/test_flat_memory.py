"""Flat search over a store larger than the memory it may use: a subprocess whose data segment is capped
(``RLIMIT_DATA``, which counts heap and anonymous maps, not the file reads) below the float32 copy of the
vectors the old flat index loaded whole answers exactly as a reference computed here from the store's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import GradientIndex, IndexOptions
from tests.helpers.search import synthetic_spec, write_store

N, K, B = 40_000, 10, 3
BUDGET = 24 << 20  # bytes the child may allocate beyond what it holds once imported: < the 78 MiB float32 copy

CHILD = """
import json, resource, sys
import numpy as np
from gradstore.store import GradientIndex, GradientStore, IndexOptions
from gradstore.store.search import FlatBackend

def data_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

store_path, index_path, queries_path, budget, float32_bytes = sys.argv[1:6]
budget, float32_bytes = int(budget), int(float32_bytes)
queries = np.load(queries_path)
FlatBackend.SCAN_BYTES = 4 << 20  # the scan's block (its default is 64 MiB of float32)
store = GradientStore.open(store_path)  # zarr's I/O thread (its stack is anonymous memory) starts before the cap
store.fingerprint()
np.ones((2048, 512), np.float32) @ np.ones((512, 4), np.float32)  # OpenBLAS allocates its work buffer once
np.ones((2048, 512)) @ np.ones((512, 4))
streamed = IndexOptions(kind="flat", normalize=True, resident_mb=0)  # the default keeps small indexes in RAM
# the scan threads start, and OpenBLAS allocates each one's work buffer, on a first search (of another copy of the
# index, so the search under the cap is a first scan too); a served process has done so long before
GradientIndex.open(index_path, store, options=streamed, device="cpu").search(queries, [1.0], 1)
limit = data_bytes() + budget
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:  # the limit bites: the float32 copy of every vector does not fit
    np.ones(float32_bytes // 4, dtype=np.float32)
    sys.exit("the float32 copy fit under the limit: the test proves nothing")
except MemoryError:
    pass
index = GradientIndex.open(index_path, store, options=streamed, device="cpu")
found = index.search(queries, [1.0], int(sys.argv[6]))
print(json.dumps({
    "pro": index.ids[found.proponent_rows].tolist(), "pro_scores": found.proponent_scores.tolist(),
    "opp": index.ids[found.opponent_rows].tolist(), "opp_scores": found.opponent_scores.tolist(),
    "peak_data": data_bytes(), "limit": limit,
}))
"""


def test_flat_search_under_a_memory_limit_smaller_than_the_vectors(tmp_path):
    rng = np.random.default_rng(11)
    spec = synthetic_spec([("w", 32, 16)])  # D = 512
    rows = rng.standard_normal((N, spec.dim)).astype(np.float16)
    store = write_store(tmp_path / "s.zarr", spec, {"c0": (0.1, rows)}, dtype="float16", chunk_rows=4096)
    GradientIndex.build(store, IndexOptions(kind="flat", normalize=True), tmp_path / "s.index", progress=False)
    float32_bytes = N * spec.dim * 4
    assert float32_bytes > BUDGET
    parts = list((tmp_path / "s.index" / "vectors").rglob("*.npy"))
    assert len(parts) == 1 and np.load(parts[0], mmap_mode="r").dtype == np.float16  # the store's precision

    # reference: the store's rows, unit-normalised and rounded to float16 as stored, scored in float64
    queries = rng.standard_normal((B, 1, spec.dim)).astype(np.float32)
    v = rows.astype(np.float32)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
    q = queries[:, 0].astype(np.float64)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    scores = q @ v.T  # [B, N]
    np.save(tmp_path / "q.npy", queries)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [tmp_path / "s.zarr", tmp_path / "s.index", tmp_path / "q.npy", BUDGET, float32_bytes, K]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["peak_data"] <= got["limit"]
    for j in range(B):
        top = np.argsort(-scores[j], kind="stable")[:K]
        bottom = np.argsort(scores[j], kind="stable")[:K]
        assert got["pro"][j] == top.tolist() and got["opp"][j] == bottom.tolist()
        np.testing.assert_allclose(got["pro_scores"][j], scores[j, top], rtol=1e-6)
        np.testing.assert_allclose(got["opp_scores"][j], scores[j, bottom], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_resident_and_streamed_flat_scans_give_the_same_answers(tmp_path, dtype):
    """``resident_mb`` only moves where the vectors live: in memory as float32 or streamed from disk by blocks."""
    from gradstore.store.search import FlatBackend

    rng = np.random.default_rng(5)
    spec = synthetic_spec([("w", 16, 8)])
    rows = rng.standard_normal((3000, spec.dim)).astype(dtype)
    store = write_store(tmp_path / "s.zarr", spec, {"c0": (0.1, rows), "c1": (0.05, rows[::-1].copy())}, dtype=dtype)
    GradientIndex.build(store, IndexOptions(kind="flat"), tmp_path / "s.index", progress=False)
    queries = rng.standard_normal((3, 2, spec.dim)).astype(np.float32)
    answers = []
    for resident_mb in (0, 16):  # 3000 x 2 x 128 float32 = 3 MiB
        index = GradientIndex.open(tmp_path / "s.index", store, options=IndexOptions(resident_mb=resident_mb))
        backend = index.backend
        assert isinstance(backend, FlatBackend) and (backend.resident is not None) == (resident_mb > 0)
        answers.append(index.search(queries, [0.1, 0.05], 7))
    streamed, resident = answers
    np.testing.assert_array_equal(resident.proponent_rows, streamed.proponent_rows)
    np.testing.assert_array_equal(resident.opponent_rows, streamed.opponent_rows)
    np.testing.assert_allclose(resident.proponent_scores, streamed.proponent_scores, rtol=1e-6)
    np.testing.assert_allclose(resident.mean_abs_score, streamed.mean_abs_score, rtol=1e-6)
