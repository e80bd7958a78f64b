"""``gradstore evaluate lds | brittleness | tail-patch | recall``: arguments and what each runs."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradstore.server.errors import EvaluationError

EVALUATIONS = ("lds", "brittleness", "tail-patch", "recall")


def _ints(value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_evaluate_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    func: Callable[[argparse.Namespace], None],
) -> None:
    """The ``evaluate`` subcommand and its four evaluations (``sub``: the CLI's subparsers; ``func``: what runs)."""
    parser = sub.add_parser("evaluate", help="validate attribution: LDS, brittleness, tail-patch, fact-tracing recall")
    kinds = parser.add_subparsers(dest="evaluation", required=True)
    helps = {
        "lds": "linear datamodeling score: retrain on random subsets (needs Task.train, or --retrain-results)",
        "brittleness": "remove each query's top-k proponents, retrain, count flipped predictions (Task.train, correct)",
        "tail-patch": "one SGD step on the top-k proponents: change of the query's target log-prob (no retraining)",
        "recall": "MRR and recall@k of the training examples labelled relevant to each query",
    }
    for kind in EVALUATIONS:
        p = with_config(kinds.add_parser(kind, help=helps[kind], description=helps[kind]))
        if kind == "recall":
            p.add_argument("--labels", required=True, help='JSON Lines: {"query": <payload>, "relevant": [ids]} a line')
            p.add_argument("--k", type=_ints, default=[10], help="recall@k for these k (default: 10)")
        else:
            p.add_argument("--queries", required=True, help="JSON Lines file of query payloads")
        if kind in ("brittleness", "tail-patch"):
            p.add_argument("--k", type=_ints, default=[10, 20, 40], help="comma-separated k (default: 10,20,40)")
            draws = 1 if kind == "brittleness" else 3
            p.add_argument("--random-draws", type=int, default=draws, help=f"random sets per k (default: {draws})")
            p.add_argument("--random-seed", type=int, default=0, help="seed of the random baseline (default: 0)")
        if kind == "lds":
            p.add_argument("--subsets", type=int, default=100, help="random training subsets (default: 100)")
            p.add_argument("--fraction", type=float, default=0.5, help="fraction of examples each keeps (default: 0.5)")
            p.add_argument("--mask-seed", type=int, default=0, help="seed of the subset masks (default: 0)")
            p.add_argument(
                "--retrain-results",
                help="npz with masks [S, N] bool, measurements [S, Q], ids [N] retrained elsewhere (see README)",
            )
        if kind in ("lds", "brittleness"):
            seeds = 3 if kind == "lds" else 1
            p.add_argument("--seeds", type=int, default=seeds, help=f"retraining seeds per model (default: {seeds})")
            p.add_argument("--workers", type=int, default=1, help="retraining processes (default: 1; torchrun: ranks)")
            p.add_argument("--cache", help="retrained models' folder (default: <run>/evaluation/retrains)")
        if kind == "tail-patch":
            p.add_argument("--lr", type=float, help="the SGD step's lr (default: the last checkpoint's lr)")
        p.add_argument(
            "--preconditioners",
            help="also compare re-indexes of the store with these preconditioners (comma-separated, or all)",
        )
        p.add_argument(
            "--measurement",
            choices=("loss", "measurement"),
            default="loss",
            help="trace and measure the Task's loss or its measurement (default: loss)",
        )
        p.add_argument(
            "--lr-weighting",
            choices=("schedule", "uniform", "normalized"),
            default="schedule",
            help="checkpoint weights of the scores (default: schedule)",
        )
        p.add_argument("--device", help="device for query gradients (default: cuda when available)")
        p.add_argument(
            "--threads",
            type=int,
            help="torch intra-op threads (default: torch's; 1 is much faster for small CPU models)",
        )
        p.add_argument("--out", help=f"results folder (default: <run>/evaluation/{kind})")
        p.add_argument("--no-plot", action="store_true", help="write evaluation.json only")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)


def _payloads(path: str) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
        payloads = [json.loads(line) for line in lines if line.strip()]
    except OSError as exc:
        raise EvaluationError(f"cannot read --queries: {exc}") from None
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"--queries must hold one JSON object a line ({exc})") from None
    if not payloads or not all(isinstance(p, dict) for p in payloads):
        raise EvaluationError("--queries must hold at least one JSON object, one a line")
    return payloads


def run_evaluation(args: argparse.Namespace, config: Any) -> dict | None:
    """Run the evaluation ``args`` asks for on ``config`` (a RunConfig); write and print its results."""
    from .attribution import parse_preconditioners
    from .context import EvaluationContext
    from .report import table, write_report
    from .retrain import task_from_config

    progress = not args.quiet
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    ctx = EvaluationContext.open(config, parse_preconditioners(args.preconditioners), args.device, progress=progress)
    out = Path(args.out) if args.out else None
    common: dict[str, Any] = {"measurement": args.measurement, "lr_weighting": args.lr_weighting, "out": out}
    result: dict | None
    if args.evaluation == "recall":
        from .recall import evaluate_recall, load_labels

        payloads, relevant = load_labels(Path(args.labels))
        result = evaluate_recall(ctx, payloads, relevant, args.k, **common)
    elif args.evaluation == "tail-patch":
        from .tail_patch import evaluate_tail_patch

        result = evaluate_tail_patch(
            ctx,
            _payloads(args.queries),
            args.k,
            args.lr,
            args.random_draws,
            args.random_seed,
            progress=progress,
            **common,
        )
    else:
        factory = functools.partial(task_from_config, str(config.path), getattr(args, "hf_output", None))
        retrain: dict[str, Any] = {
            "seeds": args.seeds,
            "workers": args.workers,
            "task_factory": factory,
            "cache_dir": Path(args.cache) if args.cache else None,
            "progress": progress,
        }
        if args.evaluation == "lds":
            from .lds import evaluate_lds

            result = evaluate_lds(
                ctx,
                _payloads(args.queries),
                args.subsets,
                args.fraction,
                mask_seed=args.mask_seed,
                retrain_results=Path(args.retrain_results) if args.retrain_results else None,
                **retrain,
                **common,
            )
        else:
            from .brittleness import evaluate_brittleness

            result = evaluate_brittleness(
                ctx,
                _payloads(args.queries),
                args.k,
                random_draws=args.random_draws,
                random_seed=args.random_seed,
                **retrain,
                **common,
            )
    if result is None:
        print("retrained this rank's share; rank 0 writes the results")
        return None
    paths = write_report(result, Path(result["out"]), plot=not args.no_plot)
    print(table(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result
