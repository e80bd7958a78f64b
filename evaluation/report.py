"""Writing an evaluation's results: ``evaluation.json``, the short table printed, and the plot beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _label(method: dict) -> str:
    tags = [t for t, on in (("configured", method.get("configured")), ("cosine", method.get("normalize"))) if on]
    return method["name"] + (f" ({', '.join(tags)})" if tags else "")


def table(result: dict) -> str:
    """The short table of an evaluation's result."""
    kind = result["evaluation"]
    if kind == "lds":
        rows = [
            [_label(m), m.get("lds"), m.get("std"), m.get("undefined"), m.get("build_s"), m.get("score_s"), m["error"]]
            for m in result["methods"]
        ]
        head = ["method", "LDS", "std", "undefined", "build_s", "score_s", "error"]
        retrained = f"{result['seeds']} seeds" if result["retrain"] is not None else "retrained elsewhere"
        title = (
            f"LDS over {result['queries']} queries, {result['subsets']} subsets of {result['fraction']:.2f}, "
            f"{retrained} ({result['measurement']})"
        )
    elif kind == "recall":
        ks = [str(k) for k in result["k"]]
        rows = [
            [_label(m), m.get("mrr"), *[m.get("recall", {}).get(k) for k in ks], m.get("score_s"), m["error"]]
            for m in result["methods"]
        ]
        head = ["method", "MRR", *[f"recall@{k}" for k in ks], "score_s", "error"]
        title = f"fact tracing over {result['queries']} labelled queries, {result['examples']} training examples"
    else:
        field = "fraction" if kind == "brittleness" else "mean_delta"
        ks = [str(k) for k in result["k"]]
        rows = [[r["name"], *[r[field].get(k) for k in ks]] for r in result["results"]]
        head = ["method", *[f"k={k}" for k in ks]]
        if kind == "brittleness":
            title = f"brittleness: fraction of {result['pairs']} (seed, correct query) pairs flipped by removing k"
        else:
            title = f"tail-patch: mean change of the queries' target log-prob after one SGD step (lr {result['lr']:g})"
        errors = [m for m in result["methods"] if m["error"]]
        rows += [[f"{m['name']} (skipped: {m['error']})", *["-"] * len(ks)] for m in errors]
    return title + "\n" + format_table(head, rows)


def write_report(result: dict, out: Path, plot: bool = True) -> dict[str, Path]:
    """``evaluation.json`` and (unless ``plot`` is off) ``<evaluation>.png`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json"}
    if plot:
        from .plot import plot_result  # matplotlib only when a plot is drawn

        paths["plot"] = plot_result(result, out / f"{result['evaluation']}.png")
        result["plot"] = str(paths["plot"])
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    return paths
