"""Sparse rows of a store (an approximate index's candidates, re-read for the exact re-score) come as byte ranges:
on a local store one ``os.preadv`` per row (not Zarr's per-request partial reads), equal to the rows of the whole
chunks they live in, in any order and with repeats."""

from __future__ import annotations

import numpy as np
import pytest

from gradstore.store import rows as rows_module
from gradstore.store.rows import CheckpointRows
from tests.helpers.search import synthetic_spec, write_store


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_sparse_rows_are_read_in_place_and_equal_whole_chunks(tmp_path, monkeypatch, dtype):
    rng = np.random.default_rng(2)
    spec = synthetic_spec([("w", 6, 4)])
    data = rng.standard_normal((200, spec.dim)).astype(dtype)
    store = write_store(tmp_path / "run.zarr", spec, {"c0": (0.1, data)}, dtype=dtype, chunk_rows=16)
    ids = np.array([5, 199, 37, 5, 120, 0, 64, 121])  # a repeat, several chunks, unsorted
    whole = CheckpointRows(store, "c0")
    monkeypatch.setattr(rows_module, "RANGED_ROWS_PER_CHUNK", 0)  # every chunk read whole, checked
    expected = whole.read(ids)
    monkeypatch.setattr(rows_module, "RANGED_ROWS_PER_CHUNK", 8)

    def no_zarr_partial_reads(*args, **kwargs):
        raise AssertionError("a local store's rows went through Zarr's partial reads")

    monkeypatch.setattr(rows_module, "sync", no_zarr_partial_reads)
    got = CheckpointRows(store, "c0").read(ids)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, expected)
    np.testing.assert_array_equal(got, data[ids])
