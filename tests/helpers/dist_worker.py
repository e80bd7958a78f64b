"""One rank of tests/test_distributed.py (gloo, CPU).

Usage: python dist_worker.py STORE OUT_DIR   with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment.

Both ranks open the same store through GradientLogger (rank and world size from torch.distributed) and
1. log checkpoint "pass" over the first 100 examples of the MLP task (chunk_rows=8);
2. capture checkpoint "cap" in a training-free loop over this rank's shuffled half of the ids
   (batches of 5, mean-reduced loss, no optimizer step, so the weights stay those of the pass).
Every Segment.write_chunk call is recorded; OUT_DIR/rank{r}.json gets the record and the rank's ids.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from crash_task import MLPTask, make_model

from gradstore.logger import GradientLogger
from gradstore.store import gradient_store

N, CHUNK, CAPTURE_BATCH, SPLIT_SEED = 100, 8, 5, 7


def rank_ids(rank: int, world: int) -> list[int]:
    """Rank r's shuffled share of the ids (the same permutation on every rank)."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    share = N // world
    return perm[rank * share : (rank + 1) * share]


def main() -> None:
    store, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()

    writes: list[dict] = []
    original = gradient_store.Segment.write_chunk

    def recording_write_chunk(self, chunk, ids, grads, *args):
        writes.append({"segment": self.name, "chunk": int(chunk), "ids": np.asarray(ids).tolist()})
        return original(self, chunk, ids, grads, *args)

    gradient_store.Segment.write_chunk = recording_write_chunk

    task = MLPTask(N)
    model = make_model()
    logger = GradientLogger(model, task, store=store, rank=4, chunk_rows=CHUNK, dtype="float32", progress=False)
    assert (logger.process_rank, logger.world_size) == (rank, world)
    computed = logger.log_checkpoint("pass", lr=0.1, batch_size=8)

    mine = rank_ids(rank, world)
    for lo in range(0, len(mine), CAPTURE_BATCH):
        batch_ids = mine[lo : lo + CAPTURE_BATCH]
        batch = task.collate([task.examples[i] for i in batch_ids])
        losses = task.loss(model, batch)
        with logger.capture(checkpoint="cap", lr=0.1, ids=batch_ids):
            losses.mean().backward()
        model.zero_grad(set_to_none=True)  # no optimizer step: the weights never change
    logger.close()
    dist.barrier()
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "world": world, "computed": computed, "capture_ids": mine, "writes": writes})
    )


if __name__ == "__main__":
    main()
