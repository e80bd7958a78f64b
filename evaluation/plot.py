"""PNG plots of evaluation results (matplotlib, Agg backend; imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

from gradstore.server.errors import EvaluationError

from .report import _label


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise EvaluationError("plots need matplotlib: pip install 'gradstore[eval]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_result(result: dict, path: Path) -> Path:
    """Draw the comparison of one evaluation's result to ``path``."""
    plt = _pyplot()
    kind = result["evaluation"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if kind in ("lds", "recall"):
            methods = [m for m in result["methods"] if m.get("lds" if kind == "lds" else "mrr") is not None]
            labels = [_label(m) for m in methods]
            if kind == "lds":
                ax.bar(labels, [m["lds"] for m in methods], yerr=[m["std"] for m in methods], capsize=4)
                ax.set_ylabel("LDS (Spearman, mean over queries)")
                ax.set_title(f"LDS: {result['subsets']} subsets x {result['seeds']} seeds, {result['queries']} queries")
            else:
                width = 0.8 / (1 + len(result["k"]))
                xs = range(len(methods))
                ax.bar([x - 0.4 + width / 2 for x in xs], [m["mrr"] for m in methods], width, label="MRR")
                for j, k in enumerate(result["k"]):
                    values = [m["recall"][str(k)] for m in methods]
                    ax.bar([x - 0.4 + width * (j + 1.5) for x in xs], values, width, label=f"recall@{k}")
                ax.set_xticks(list(xs), labels)
                ax.legend()
                ax.set_title(f"fact tracing: {result['queries']} labelled queries")
            ax.axhline(0.0, color="black", linewidth=0.8)
        else:
            field = "fraction" if kind == "brittleness" else "mean_delta"
            for row in result["results"]:
                values = [row[field][str(k)] for k in result["k"]]
                style = "--" if row["name"] == "random" else "-"
                ax.plot(
                    result["k"],
                    [float("nan") if v is None else v for v in values],
                    style,
                    marker="o",
                    label=row["name"],
                )
            ax.set_xlabel("k (examples removed)" if kind == "brittleness" else "k (examples in the step)")
            ax.set_ylabel(
                "fraction of predictions flipped" if kind == "brittleness" else "mean change of target log-prob"
            )
            ax.set_title(kind)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
