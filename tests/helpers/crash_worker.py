"""Child process of tests/test_crash_resume.py: logs checkpoint "c0" of the MLP task, optionally dying by SIGKILL.

Usage: python crash_worker.py STORE MODE [ARG]
  MODE none      run to completion, print {"computed": rows}
  MODE loss N    SIGKILL inside the N-th call of Task.loss (mid-chunk)
  MODE write K   SIGKILL inside Segment.write_chunk for chunk K, after its grads/ids are written, before its commit
  MODE create    SIGKILL inside GradientStore.create, after the store is written aside, before it is renamed in
"""

from __future__ import annotations

import json
import os
import signal
import sys

from crash_task import MLPTask, make_model

from gradstore.logger import GradientLogger
from gradstore.store import gradient_store


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillingTask(MLPTask):
    def __init__(self, kill_at_call: int):
        super().__init__()
        self.kill_at_call = kill_at_call

    def loss(self, model, batch):
        if self.loss_calls + 1 == self.kill_at_call:
            die()
        return super().loss(model, batch)


def install_write_kill(kill_chunk: int) -> None:
    """Die inside ``Segment.write_chunk`` for ``kill_chunk``: after its grads and ids are written, before its commit."""
    original = gradient_store.Segment.commit_chunk

    def commit_chunk(self, chunk, rows):
        if chunk == kill_chunk:
            die()
        return original(self, chunk, rows)

    gradient_store.Segment.commit_chunk = commit_chunk


def install_create_kill() -> None:
    def rename_into_place(built, target):
        assert (built / "zarr.json").exists() and (built / "checkpoints").exists()
        die()

    gradient_store.rename_into_place = rename_into_place


def main() -> None:
    store, mode = sys.argv[1], sys.argv[2]
    if mode == "loss":
        task = KillingTask(int(sys.argv[3]))
    else:
        task = MLPTask()
    if mode == "write":
        install_write_kill(int(sys.argv[3]))
    if mode == "create":
        install_create_kill()
    model = make_model()
    logger = GradientLogger(model, task, store=store, rank=4, chunk_rows=16, dtype="float32", progress=False)
    computed = logger.log_checkpoint("c0", lr=0.1, batch_size=8)
    logger.close()
    print(json.dumps({"computed": computed, "loss_calls": task.loss_calls}))


if __name__ == "__main__":
    main()
