"""TrackStar's Adam second-moment correction, kept Kronecker-friendly.

Adam divides the gradient element-wise by ``sqrt(v_hat) + eps``. Element-wise division would break
the Kronecker structure, so the denominator is replaced by its rank-1 (Adafactor-style) factorisation
``r c^T``; then ``G / (r c^T) = diag(1/r) G diag(1/c)``, which folds into the projections for free:
``P_out diag(1/r)`` and ``P_in diag(1/c)``.
"""

from __future__ import annotations

import torch

from .matrices import LayerMatrices


def rank1_denominator(
    exp_avg_sq: torch.Tensor, step: int | None = None, beta2: float = 0.999, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor Adam's denominator ``sqrt(v / (1 - beta2^step)) + eps ~ r c^T``.

    ``exp_avg_sq`` is the canonical ``[d_out, in_dim]`` matrix. The factors are the row sums and the
    column sums over the total (Adafactor's KL-optimal rank-1 fit of a positive matrix; exact when the
    matrix is rank 1). Returned as float32 ``r: [d_out]``, ``c: [in_dim]``.
    """
    v = exp_avg_sq.detach().to(torch.float64).clamp_min(0)
    if step is not None and step > 0:
        v = v / (1.0 - beta2**step)
    denom = v.sqrt() + eps
    r = denom.sum(dim=1)
    c = denom.sum(dim=0) / denom.sum()
    return r.to(torch.float32), c.to(torch.float32)


def fold_denominator(matrices: LayerMatrices, r: torch.Tensor, c: torch.Tensor) -> LayerMatrices:
    """Projections that compute ``P_out diag(1/r) G diag(1/c) P_in^T`` from the raw gradient ``G``."""
    return LayerMatrices(
        p_in=matrices.p_in / c.to(matrices.p_in.device)[None, :],
        p_out=matrices.p_out / r.to(matrices.p_out.device)[None, :],
    )
