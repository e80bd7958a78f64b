"""Logging overhead on a small transformer (4 layers, d_model 256, seq 128), CPU by default.

Side by side in one run, each mode in a fresh subprocess (so peak RSS is its own):
  plain    forward + backward of a training step (mean loss)
  capture  the same step inside ``logger.capture()`` (projected per-example grads written to a store)
  pass     ``logger.log_checkpoint`` over the examples (offline pass), vs plain forward+backward throughput

    python benchmarks/logging_overhead.py [--batch 8] [--steps 20] [--rank 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    from _models import RandomTextTask

    from gradstore.logger import GradientLogger

    torch.manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    task = RandomTextTask(n=n)
    model = task.build_model().to(args.device)
    data = task.train_examples().to(args.device)
    tmp = tempfile.mkdtemp()
    logger = None
    if mode != "plain":
        logger = GradientLogger(model, task, store=f"{tmp}/run.zarr", rank=args.rank, progress=False)
    if mode == "pass":
        logger.log_checkpoint("warmup", lr=0.1, examples=data[: args.batch * args.warmup], batch_size=args.batch)
        _sync(args.device)
        start = time.perf_counter()
        logger.log_checkpoint("bench", lr=0.1, examples=data[args.batch * args.warmup :], batch_size=args.batch)
        _sync(args.device)
        elapsed = time.perf_counter() - start
        logger.close()
        return {
            "mode": mode,
            "examples_per_s": args.batch * args.steps / elapsed,
            "peak_rss_mib": _peak_rss_mib(),
            "dim": logger.spec.dim,
        }
    times = []
    for step in range(args.steps + args.warmup):
        batch = data[step * args.batch : (step + 1) * args.batch]
        _sync(args.device)
        start = time.perf_counter()
        losses = task.loss(model, batch)
        if logger is None:
            losses.mean().backward()
        else:
            with logger.capture("epoch-0", lr=0.1, ids=range(step * args.batch, (step + 1) * args.batch)):
                losses.mean().backward()
        model.zero_grad(set_to_none=True)
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if logger is not None:
        start = time.perf_counter()
        logger.close()  # the last writes are part of the cost
        times[-1] += time.perf_counter() - start
    step_s = statistics.median(times)
    return {
        "mode": mode,
        "step_ms": 1000 * step_s,
        "examples_per_s": args.batch / step_s,
        "peak_rss_mib": _peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the modes this many times; best of each")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in ("plain", "capture", "pass"):
            cmd = [sys.executable, __file__, "--mode", mode] + [
                f"--{k}={v}" for k, v in vars(args).items() if k != "mode"
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.setdefault(mode, []).append(json.loads(out.strip().splitlines()[-1]))
    best = {mode: max(runs, key=lambda r: r["examples_per_s"]) for mode, runs in results.items()}
    plain, capture, passes = best["plain"], best["capture"], best["pass"]
    rss = {mode: min(r["peak_rss_mib"] for r in runs) for mode, runs in results.items()}
    print(
        f"device={args.device} batch={args.batch} seq=128 d_model=256 layers=4 rank={args.rank} D={passes['dim']} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"plain fwd+bwd step   {plain['step_ms']:8.1f} ms   {plain['examples_per_s']:7.1f} ex/s   "
        f"peak RSS {rss['plain']:7.0f} MiB"
    )
    print(
        f"step with capture()  {capture['step_ms']:8.1f} ms   {capture['examples_per_s']:7.1f} ex/s   "
        f"peak RSS {rss['capture']:7.0f} MiB"
    )
    print(f"checkpoint pass                    {passes['examples_per_s']:7.1f} ex/s   peak RSS {rss['pass']:7.0f} MiB")
    print(f"capture overhead: {100 * (capture['step_ms'] / plain['step_ms'] - 1):+.1f}% step time (target <= +10%)")
    print(f"pass throughput: {passes['examples_per_s'] / plain['examples_per_s']:.2f}x plain fwd+bwd (target >= 0.85x)")
    print(
        f"peak RSS: capture {100 * (rss['capture'] / rss['plain'] - 1):+.1f}%, "
        f"pass {100 * (rss['pass'] / rss['plain'] - 1):+.1f}% vs plain (target within 10%)"
    )


if __name__ == "__main__":
    main()
