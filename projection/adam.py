"""TrackStar's optimizer second-moment correction, kept Kronecker-friendly.

Adam divides the gradient element-wise by ``D = sqrt(v_hat) + eps``. Element-wise division would break
the Kronecker structure, so ``D`` (canonical ``[d_out, in_dim]`` layout) is replaced by its rank-1
(Adafactor-style) factorisation ``r c^T``; then ``G / (r c^T) = diag(1/r) G diag(1/c)``, which folds into
the projections for free: ``P_out diag(1/r)`` and ``P_in diag(1/c)``.

A factor may be ``inf``: ``1/inf = 0`` zeroes that row or column of every folded gradient. It marks rows
and columns whose second moment is exactly zero (a token never seen in training, a dead unit): no training
gradient ever reached them, so their training rows are zero there and every exact score is unchanged by
dropping the component, while keeping it would divide a query's gradient by ``~eps`` and let it swamp
the vector (its norm, its random projection, the curvature whitening).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ProjectionSpecError
from .matrices import LayerMatrices


@dataclass(frozen=True)
class Rank1Fit:
    """``D ~ r c^T`` (float32; ``inf`` where zeroed) and how many rows/columns were zeroed or floored."""

    r: torch.Tensor
    c: torch.Tensor
    zeroed_rows: int = 0
    zeroed_cols: int = 0
    floored_rows: int = 0
    floored_cols: int = 0


def adam_denominator(
    exp_avg_sq: torch.Tensor, step: float | None = None, beta2: float = 0.999, eps: float = 1e-8
) -> torch.Tensor:
    """``sqrt(v / (1 - beta2^step)) + eps`` in float64: ``torch.optim.Adam``/``AdamW``'s denominator.

    With ``amsgrad`` pass ``max_exp_avg_sq`` as ``exp_avg_sq`` (torch uses ``sqrt(max_v) / sqrt(bc2) + eps``).
    ``step`` None or 0: no bias correction.
    """
    v = exp_avg_sq.detach().to(torch.float64).clamp_min(0)
    if step is not None and step > 0:
        v = v / (1.0 - beta2**step)
    return v.sqrt() + eps


def adafactor_denominator(exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor) -> torch.Tensor:
    """Adafactor's denominator ``sqrt(row col^T / mean(row))`` in the parameter's shape (float64).

    Hugging Face's ``Adafactor`` updates ``grad * _approx_sq_grad(row, col)`` with
    ``_approx_sq_grad = (row / row.mean(-1))^-1/2 (x) col^-1/2``, so the gradient is divided by
    ``D_ij = sqrt(row_i / mean(row)) * sqrt(col_j)``: exactly rank 1 over the last two dimensions, with
    ``r = sqrt(row / mean(row))`` and ``c = sqrt(col)``. ``row``/``col`` already hold Adafactor's ``eps[0]``
    (added to ``grad^2`` before averaging) and need no bias correction (``beta2_1 = 0``). Update clipping and
    parameter scaling are per-tensor scalars that depend on the step's own gradient and are not part of ``D``.
    """
    row = exp_avg_sq_row.detach().to(torch.float64).clamp_min(0)
    col = exp_avg_sq_col.detach().to(torch.float64).clamp_min(0)
    return ((row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)).sqrt()


def rank1_fit(denominator: torch.Tensor, dead: torch.Tensor | None = None, floor: float = 0.0) -> Rank1Fit:
    """Fit ``denominator ~ r c^T`` (``[d_out, in_dim]``), zeroing dead rows/columns and flooring the rest.

    The fit is Adafactor's KL-optimal rank-1 fit of a positive matrix (row sums times column sums over
    the total; exact when the matrix is rank 1), taken over the rows and columns that are not entirely
    ``dead``. Those get ``inf`` (the folded gradient is zero there). Every other factor is raised to at least
    ``floor`` times the median of its side, which bounds how much the fold can amplify a nearly-dead row or
    column relative to a typical one (``1 / floor``); ``floor = 0`` keeps the plain fit.
    """
    d = denominator.detach().to(torch.float64)
    if d.ndim != 2:
        raise ProjectionSpecError(f"rank1_fit needs a [d_out, in_dim] matrix, got shape {tuple(d.shape)}")
    if dead is None:
        dead = torch.zeros_like(d, dtype=torch.bool)
    dead_rows, dead_cols = dead.all(dim=1), dead.all(dim=0)
    r = torch.full((d.shape[0],), torch.inf, dtype=torch.float64)
    c = torch.full((d.shape[1],), torch.inf, dtype=torch.float64)
    floored = [0, 0]
    live = d[~dead_rows][:, ~dead_cols]
    if live.numel():
        r_live, c_live = live.sum(dim=1), live.sum(dim=0) / live.sum()
        for side, values in enumerate((r_live, c_live)):
            if floor > 0:
                bound = floor * values.median()
                floored[side] = int((values < bound).sum())
                values.clamp_(min=float(bound))
        r[~dead_rows], c[~dead_cols] = r_live, c_live
    return Rank1Fit(
        r.to(torch.float32),
        c.to(torch.float32),
        zeroed_rows=int(dead_rows.sum()),
        zeroed_cols=int(dead_cols.sum()),
        floored_rows=floored[0],
        floored_cols=floored[1],
    )


def rank1_denominator(
    exp_avg_sq: torch.Tensor, step: int | None = None, beta2: float = 0.999, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor Adam's denominator ``sqrt(v / (1 - beta2^step)) + eps ~ r c^T`` (plain fit: no zeroing, no floor).

    ``exp_avg_sq`` is the canonical ``[d_out, in_dim]`` matrix. Returned as float32 ``r: [d_out]``, ``c: [in_dim]``.
    """
    fit = rank1_fit(adam_denominator(exp_avg_sq, step=step, beta2=beta2, eps=eps))
    return fit.r, fit.c


def fold_denominator(matrices: LayerMatrices, r: torch.Tensor, c: torch.Tensor) -> LayerMatrices:
    """Projections that compute ``P_out diag(1/r) G diag(1/c) P_in^T`` from the raw gradient ``G``.

    An ``inf`` factor gives a zero column of the folded matrix: that row/column of ``G`` is dropped.
    """
    return LayerMatrices(
        p_in=matrices.p_in / c.to(matrices.p_in.device)[None, :],
        p_out=matrices.p_out / r.to(matrices.p_out.device)[None, :],
    )
