"""Run the foreign-models suite's cases (tests/helpers/foreign_models.py) and print each one's classification.

Each case is a model re-created from another library's public tests or a Hugging Face family (tiny, CPU), run
through ``GradientProjector.project`` or ``GradientLogger.capture`` at full-rank orthonormal projection and
classified as exact / refused (layer named) / SILENTLY WRONG / SILENTLY PARTIAL / UNEXPLAINED CRASH against
exact float64 per-example gradients. tests/test_foreign_models.py asserts the same cases pass.

    python benchmarks/foreign_models_report.py [-k SUBSTRING] [--failing]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers.foreign_models

import torch  # noqa: E402

from tests.helpers.foreign_models import CASES, PASSING, run_case, summary_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--failing", action="store_true", help="list only the cases that do not pass")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    outcomes = [run_case(case) for case in CASES if args.k in case.name]
    shown = [o for o in outcomes if o.status not in PASSING] if args.failing else outcomes
    print(summary_table(shown))
    print(f"wall {time.perf_counter() - start:.1f} s")
    return 0 if all(o.status in PASSING or o.status == "skipped" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
