"""Attribution quality of every preconditioner x normalisation x Adam setting, from one store each.

* digits (the embedded demo: MLP, SGD, 4 checkpoints captured in training): LDS (``gradstore evaluate lds``) over
  ``--queries`` held-out digits, ``--subsets`` random halves, ``--seeds`` retraining seeds. The demo trains with SGD,
  so it has no Adam state: the Adam setting does not apply there.
* facts (tests/helpers/facts.py: a tiny causal LM, Adam, 3 checkpoints, 60 planted facts): MRR and recall@10 of the
  3 training sequences that state each fact (``gradstore evaluate recall``), with and without TrackStar's Adam
  correction (the Adam store is logged with each checkpoint's optimizer state).

Every preconditioner of ``gradstore.projection.PRECONDITIONERS`` is a re-index of the same store; build time is the
index build, query time the query gradients plus the scores of every training example, per query.

    python benchmarks/attribution_quality.py [--workdir runs/bench-quality] [--queries 50 --subsets 100 --seeds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers.facts

from gradstore.demos.digits import prepare_demo  # noqa: E402
from gradstore.evaluation import EvaluationContext, evaluate_lds, evaluate_recall  # noqa: E402
from gradstore.evaluation.report import format_table  # noqa: E402
from gradstore.projection import PRECONDITIONERS  # noqa: E402
from gradstore.server.run import index_run  # noqa: E402
from gradstore.server.run.config import RunConfig  # noqa: E402
from gradstore.store import GradientIndex, GradientStore  # noqa: E402

FACTS_TOML = """
[task]
object = "tests.helpers.facts:FactsTask"

[projection]
rank = [16, 16]
seed = 0

[store]
path = "{store}"
dtype = "float32"

{checkpoints}
[index]
kind = "flat"
normalize = {normalize}
path = "{index}"
"""


def variant(config_path: Path, normalize: bool) -> Path:
    """The run config with ``[index] normalize`` set (its own index directory beside the store)."""
    if not normalize:
        return config_path
    text = config_path.read_text().replace("normalize = false", 'normalize = true\npath = "cosine.index"')
    out = config_path.with_name(config_path.stem + "-cosine.toml")
    out.write_text(text)
    return out


def fresh_context(config_path: Path, directory: Path) -> EvaluationContext:
    """(Re)build the configured index, timed, and every other preconditioner's aside (timed as they are built)."""
    config = RunConfig.load(config_path)
    start = time.perf_counter()
    GradientIndex.build(GradientStore.open(config.store.path), config.index, path=config.index_path, progress=False)
    build_s = time.perf_counter() - start
    shutil.rmtree(directory / "indexes", ignore_errors=True)
    ctx = EvaluationContext.open(config, PRECONDITIONERS, device="cpu", directory=directory)
    ctx.methods[0].build_s = build_s
    return ctx


def digits(workdir: Path, queries: int, subsets: int, seeds: int, workers: int) -> list[list]:
    config_path = prepare_demo(workdir / "digits", progress=False)
    payloads = [{"test_index": i} for i in range(queries)]
    rows = []
    for normalize in (False, True):
        directory = workdir / "digits" / "evaluation" / ("cosine" if normalize else "plain")
        ctx = fresh_context(variant(config_path, normalize), directory)
        result = evaluate_lds(
            ctx,
            payloads,
            subsets,
            0.5,
            seeds,
            workers=workers,
            task_factory=_digits_factory if workers > 1 else None,
            cache_dir=workdir / "digits" / "retrains",
            out=directory / "lds",
        )
        assert result is not None
        for m in result["methods"]:
            per_query_ms = 1e3 * m["score_s"] / queries if m.get("score_s") else None
            rows.append(
                [
                    "digits",
                    m["preconditioner"],
                    normalize,
                    "n/a (SGD)",
                    m.get("lds"),
                    None,
                    None,
                    m["build_s"],
                    per_query_ms,
                    m["error"],
                ]
            )
    return rows


def _digits_factory():
    from gradstore.demos.digits import DigitsTask

    return DigitsTask()


def facts(workdir: Path) -> list[list]:
    from tests.helpers.facts import FactsTask, train_with_checkpoints

    directory = workdir / "facts"
    directory.mkdir(parents=True, exist_ok=True)
    task = FactsTask()
    entries: dict[str, list[str]] = {"plain": [], "adam": []}
    for step, lr, model, optimizer in train_with_checkpoints(task, 600, [200, 400, 600], 1e-2):
        torch.save(model.state_dict(), directory / f"step{step}.pt")
        torch.save(optimizer.state_dict(), directory / f"step{step}.opt.pt")
        entry = f'[[checkpoints]]\nname = "step{step}"\npath = "step{step}.pt"\nlr = {lr}\nstep = {step}\n'
        entries["plain"].append(entry)
        entries["adam"].append(entry + f'optimizer = "step{step}.opt.pt"\n')
    payloads = [{"fact": f} for f in range(len(task.facts))]
    relevant = [sorted(task.relevant(f)) for f in range(len(task.facts))]
    rows = []
    for adam in ("plain", "adam"):
        for normalize in (False, True):
            name = f"{adam}{'-cosine' if normalize else ''}"
            path = directory / f"{name}.toml"
            path.write_text(
                FACTS_TOML.format(
                    store=f"{adam}.zarr",
                    checkpoints="\n".join(entries[adam]),
                    normalize=str(normalize).lower(),
                    index=f"{name}.index",
                )
            )
            index_run(RunConfig.load(path), progress=False)
            ctx = fresh_context(path, directory / "evaluation" / name)
            result = evaluate_recall(ctx, payloads, relevant, (10,), out=directory / "evaluation" / name / "recall")
            for m in result["methods"]:
                per_query_ms = 1e3 * m["score_s"] / len(payloads) if m.get("score_s") else None
                rows.append(
                    [
                        "facts",
                        m["preconditioner"],
                        normalize,
                        adam == "adam",
                        None,
                        m.get("mrr"),
                        (m.get("recall") or {}).get("10"),
                        m["build_s"],
                        per_query_ms,
                        m["error"],
                    ]
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-quality")
    parser.add_argument("--queries", type=int, default=50, help="digits LDS queries (test digits 0..Q-1)")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="retraining processes")
    parser.add_argument("--skip", choices=("digits", "facts"), help="leave one task out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    workdir = Path(args.workdir)
    rows = []
    if args.skip != "digits":
        rows += digits(workdir, args.queries, args.subsets, args.seeds, args.workers)
    if args.skip != "facts":
        rows += facts(workdir)
    head = ["task", "preconditioner", "cosine", "adam", "LDS", "MRR", "recall@10", "build_s", "query_ms", "error"]
    print(format_table(head, [[*r[:-1], (r[-1] or "")[:60] or None] for r in rows]))


if __name__ == "__main__":
    main()
