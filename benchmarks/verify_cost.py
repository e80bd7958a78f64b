"""Cost of the first-batch exactness check, side by side with the unchecked path, in one process.

For ``project`` (offline pass / queries) and ``capture`` (a training step), each measured with the check on
(``verify=True``, the default) and off, on a fresh logger each repeat (the check runs on a logger's first batch
only), in rotating order:

  first batch   time of the first batch with the check, as a % over the same batch without it
  later batches time of later batches, checked vs unchecked logger (the check runs once: ~0%)

    python benchmarks/verify_cost.py [--batch 8] [--repeats 5] [--layers 4] [--width 256] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import RandomTextTask, SmallGPT

from gradstore.logger import GradientLogger


class _Task(RandomTextTask):
    def __init__(self, n: int, seq: int, width: int, layers: int):
        super().__init__(n=n, seq=seq)
        self.width, self.layers = width, layers

    def build_model(self):
        torch.manual_seed(0)
        return SmallGPT(d=self.width, layers=self.layers, seq=self.seq)


def _timed_batches(task: _Task, mode: str, verify: bool, batch: int, later: int) -> tuple[float, float]:
    """Seconds of the first batch and the mean of ``later`` batches on a fresh logger."""
    model = task.build_model()
    data = task.train_examples()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        logger = GradientLogger(model, task, store=f"{tmp}/s.zarr", rank=16, progress=False, verify=verify)
        times = []
        for step in range(1 + later):
            examples = data[step * batch : (step + 1) * batch]
            start = time.perf_counter()
            if mode == "project":
                logger.project(examples)
            else:
                losses = task.loss(model, examples)
                ids = list(range(step * batch, (step + 1) * batch))
                with logger.capture("c", lr=0.1, ids=ids, losses=losses if verify else None):
                    losses.mean().backward()
                model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        logger.close()
    return times[0], statistics.mean(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--later", type=int, default=4, help="batches after the first, per repeat")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = _Task(n=args.batch * (1 + args.later), seq=args.seq, width=args.width, layers=args.layers)
    print(f"{args.layers}x{args.width}, seq {args.seq}, batch {args.batch}, rank 16, {args.threads} threads")
    for mode in ("project", "capture"):
        first: dict[bool, list[float]] = {True: [], False: []}
        later: dict[bool, list[float]] = {True: [], False: []}
        _timed_batches(task, mode, False, args.batch, 1)  # warm-up
        for repeat in range(args.repeats):
            for verify in (True, False) if repeat % 2 == 0 else (False, True):  # rotating order
                a, b = _timed_batches(task, mode, verify, args.batch, args.later)
                first[verify].append(a)
                later[verify].append(b)
        f_on, f_off = statistics.median(first[True]), statistics.median(first[False])
        l_on, l_off = statistics.median(later[True]), statistics.median(later[False])
        print(
            f"{mode:>8}: first batch {1e3 * f_on:7.1f} ms checked vs {1e3 * f_off:7.1f} ms unchecked "
            f"(+{100 * (f_on / f_off - 1):.0f}%); later batches {1e3 * l_on:6.1f} vs {1e3 * l_off:6.1f} ms "
            f"({100 * (l_on / l_off - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
