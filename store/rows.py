"""Random access to a checkpoint's committed rows by example id, reading each touched Zarr chunk once."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import DuplicateIdError, UnknownExampleError
from .gradient_store import GradientStore


class CheckpointRows:
    """Where every committed row of one checkpoint lives (part, row), addressable by example id."""

    def __init__(self, store: GradientStore, checkpoint: str):
        self.store, self.checkpoint = store, checkpoint
        self.parts = store.parts(checkpoint)
        ids, part_of, row_of = [], [], []
        for p, part in enumerate(self.parts):
            for start, stop in part.row_ranges():
                ids.append(np.asarray(part.group["ids"][start:stop]))
                part_of.append(np.full(stop - start, p, dtype=np.int32))
                row_of.append(np.arange(start, stop, dtype=np.int64))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        part_of_all = np.concatenate(part_of) if part_of else np.zeros(0, np.int32)
        row_of_all = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)
        order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[order]
        if len(self.sorted_ids) and (np.diff(self.sorted_ids) == 0).any():
            dup = self.sorted_ids[1:][np.diff(self.sorted_ids) == 0]
            raise DuplicateIdError(f"checkpoint {checkpoint!r} holds example ids more than once: {dup[:10].tolist()}")
        self._part = part_of_all[order]
        self._row = row_of_all[order]

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.sorted_ids, ids)
        pos = np.minimum(pos, max(len(self.sorted_ids) - 1, 0))
        hit = self.sorted_ids[pos] == ids if len(self.sorted_ids) else np.zeros(len(ids), bool)
        if not hit.all():
            missing = ids[~hit]
            raise UnknownExampleError(f"checkpoint {self.checkpoint!r} has no committed row for ids {missing[:10].tolist()}")
        return pos

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``[n, D]`` (store dtype) for the given ids, in their order."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._locate(ids)
        parts, rows = self._part[pos], self._row[pos]
        out = np.empty((len(ids), self.store.dim), dtype=self.store.dtype)
        chunk_rows = self.store.chunk_rows
        for p in np.unique(parts):
            in_part = np.flatnonzero(parts == p)
            grads = self.parts[int(p)].group["grads"]
            chunks = rows[in_part] // chunk_rows
            for chunk in np.unique(chunks):
                sel = in_part[chunks == chunk]
                lo = int(chunk) * chunk_rows
                block = np.asarray(grads[lo : min(lo + chunk_rows, grads.shape[0])])
                out[sel] = block[rows[sel] - lo]
        return out
