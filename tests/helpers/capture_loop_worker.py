"""Child process of tests/test_capture_crash.py: the README's resumable training loop with capture(), killed on cue.

Usage: python capture_loop_worker.py RUN_DIR [POINT STEP]
  POINT is where SIGKILL hits at global step STEP: ``captured`` (after the step's capture, before anything is
  saved), ``flushed`` (after logger.flush(), before the training state is saved), ``saved`` (right after the
  training state is saved). Without POINT the loop runs to the end (or resumes and finishes).
The loop resumes from RUN_DIR/state.pt when it exists, exactly as the README's loop does. NO_FLUSH=1 leaves out
the flush before saving the state (the unsafe loop).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from crash_task import MLPTask

from gradstore.logger import GradientLogger

EPOCHS, BATCH, SAVE_EVERY, LR = 2, 8, 3, 0.1


def main() -> None:
    run = Path(sys.argv[1])
    kill_point, kill_step = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else (None, -1)
    task = MLPTask()
    examples = task.train_examples()
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    start_epoch, start_batch, generator = 0, 0, torch.Generator().manual_seed(7)
    if (run / "state.pt").exists():  # resume
        state = torch.load(run / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch = state["epoch"], state["batch"]
        generator.set_state(state["generator"])
    logger = GradientLogger(
        model, task, store=run / "store.zarr", rank=4, chunk_rows=16, dtype="float32", progress=False
    )
    step = 0
    for epoch in range(start_epoch, EPOCHS):
        epoch_generator_state = generator.get_state()
        order = torch.randperm(len(examples), generator=generator)
        for b, ids in enumerate(order.split(BATCH)):
            if epoch == start_epoch and b < start_batch:
                continue
            step = epoch * 1000 + b
            batch = task.collate([examples[int(i)] for i in ids])
            losses = task.loss(model, batch)
            with logger.capture(checkpoint=f"epoch-{epoch}", lr=LR, ids=ids, step=epoch):
                losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == kill_step and kill_point == "captured":
                os.kill(os.getpid(), signal.SIGKILL)
            if (b + 1) % SAVE_EVERY == 0:
                if not os.environ.get("NO_FLUSH"):  # the unsafe loop, to show what the flush prevents
                    logger.flush()  # commit the captured rows *before* the training state that skips past them
                if step == kill_step and kill_point == "flushed":
                    os.kill(os.getpid(), signal.SIGKILL)
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "batch": b + 1,
                    "generator": epoch_generator_state,
                }
                torch.save(state, run / "state.tmp")
                os.replace(run / "state.tmp", run / "state.pt")
                if step == kill_step and kill_point == "saved":
                    os.kill(os.getpid(), signal.SIGKILL)
        start_batch = 0
    logger.close()


if __name__ == "__main__":
    main()
