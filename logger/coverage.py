"""Coverage: which of a model's trainable parameters the logged blocks cover, and which they skip.

A TracIn score sums over the logged parameters only, so a user must know what that is. The figure is
recorded in the store (``gradstore info``, ``/v1/run``, the dashboard show it) and ``layers=["*"]`` covering
less than every trainable parameter warns once with the list of what it skips.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .selection import SelectedLayer, covered_parameters


@dataclass(frozen=True)
class Coverage:
    """``fraction`` of trainable parameter elements logged (a tied one once); ``skipped``: names of the rest."""

    fraction: float
    logged_elements: int
    total_elements: int
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fraction"] = round(self.fraction, 6)
        return out

    def describe(self) -> str:
        """One line: ``"99.2% of 1,234 trainable parameter elements (skipped: a.weight, b)"``."""
        skipped = f" (skipped: {', '.join(self.skipped[:12])}{' ...' if len(self.skipped) > 12 else ''})"
        return f"{100 * self.fraction:.1f}% of {self.total_elements:,} trainable parameter elements" + (
            skipped if self.skipped else ""
        )


def coverage_of(model: nn.Module, layers: Sequence[SelectedLayer]) -> Coverage:
    """The coverage of ``layers`` over ``model``'s trainable parameters."""
    covered = {id(p) for p in covered_parameters(layers)}
    logged = total = 0
    skipped: list[str] = []
    for name, param in model.named_parameters():  # a tied parameter once, under its first name
        if not param.requires_grad:
            continue
        total += param.numel()
        if id(param) in covered:
            logged += param.numel()
        else:
            skipped.append(name)
    return Coverage(logged / total if total else 1.0, logged, total, skipped)


def warn_partial_coverage(coverage: Coverage) -> None:
    """Warn once when ``layers=["*"]`` leaves trainable parameters out."""
    if coverage.skipped:
        warnings.warn(
            f"layers=['*'] logs {coverage.describe()}: these parameters are in no supported module, so TracIn scores "
            "leave their gradients out. Name the layers to log instead of '*' to silence this",
            stacklevel=4,
        )
