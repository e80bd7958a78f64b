"""SOURCE (Bae et al. 2024, "Training Data Attribution via Approximate Unrolled Differentiation") in projected space.

Derivation. SGD with per-step lr ``eta_k`` and batch ``B``: ``theta_{k+1} = theta_k - eta_k / B sum_i (1 + delta_ki
eps) grad L(z_ki, theta_k)``, where ``delta_ki`` marks the example ``z`` being up-weighted by ``eps``. To first order
``d theta_T / d eps = -sum_k eta_k / B delta_k J_{k+1:T} g_k`` with ``J_k = I - eta_k H_k`` and ``g_k`` the gradient
of ``z``. Split training at the checkpoints into intervals ``l = 1..L`` (steps ``T_{l-1} < k <= T_l``, ``K_l = T_l -
T_{l-1}`` of them), take each segment's Hessian, lr and gradient as stationary (``H_l``, ``eta_l``, ``g_l``) and
independent across segments, and average over batch orders (``E[delta_k] / B = 1 / N``)::

    E[d theta_T / d eps] ~ -1/N sum_l (S_L ... S_{l+1}) r_l
    S_l = (I - eta_l H_l)^{K_l}                               ~ exp(-eta_l K_l H_l)
    r_l = sum_{j=0}^{K_l - 1} eta_l (I - eta_l H_l)^j g_l     = (I - (I - eta_l H_l)^{K_l}) H_l^{-1} g_l
                                                              ~ (I - exp(-eta_l K_l H_l)) H_l^{-1} g_l

A query measurement ``f`` at the final weights has ``df / d eps = q^T d theta_T / d eps`` with ``q = grad f(theta_T)``.
gradstore's sign and scale convention (proponents positive; TracIn's ``sum_c lr_c <q, g_c>``) drops ``-1/N``::

    score(q, z) = sum_l q^T [prod_{l' > l} exp(-eta_l' K_l' H_l')] (I - exp(-eta_l K_l H_l)) H_l^{-1} g_l.

With ``eta K H`` small every factor is ``~ eta_l K_l I``: SOURCE reduces to TracIn with the final checkpoint's query
and weights ``eta_l K_l``; with ``eta K H`` large it is an influence function ``q^T H_L^{-1} g_L``.

In gradstore, checkpoint ``c`` (in index order, steps strictly increasing) ends segment ``c``: its stored per-example
vectors are ``g_c``, its EK-FAC curvature from them (:mod:`.ekfac`, the empirical Fisher, i.e. the Gauss-Newton
Hessian for log-likelihood losses, in projected space) is ``H_c``, its lr is ``eta_c`` and ``K_c = t_c - t_{c-1}``
(``t_0 = 0``: the first segment runs from the start of training). Everything but ``q`` is training-side, so the index
stores ``T_c g_c`` with ``T_c = S_L ... S_{c+1} F_c``, ``F_c = (I - exp(-eta_c K_c H_c)) H_c^{-1}``, and the query
is ``q`` at the final checkpoint, unchanged, in every checkpoint's slot with weight 1: the search's
``sum_c <q, T_c g_c>`` is the score above. EK-FAC is block-diagonal over layers, so ``T_c`` is too; within a layer
every factor is a function of one ``H_s`` applied in that segment's Kronecker eigenbasis
(:func:`.ekfac.eigenbasis_apply`), so ``T_c`` is a chain of ``L - c + 1`` such maps, never a dense ``k x k`` matrix
(the bases differ between segments, the chain does not need them to agree).

Damping: ``H_c`` is damped like every curvature here, ``Lambda + damping * mean(Lambda)``. SOURCE does not need it
for stability (``(1 - exp(-eta K s)) / s -> eta K`` as ``s -> 0``); it acts as a weight decay in the dynamics.
Approximations beyond the paper's: ``H_c`` and ``g_c`` are measured at the segment's end rather than averaged over
it (the store holds one pass per checkpoint), and the 1/N is dropped.

Options: the lr is inside ``T_c``, so the only lr weighting that makes sense is ``uniform`` (``schedule`` and
``normalized`` would apply it twice); a checkpoint subset sums over those segments. ``normalize`` unit-normalises
``q`` and each ``T_c g_c``: the score becomes ``sum_c cos(q, T_c g_c)``, the cosine between the query gradient and
the change of the final parameters that the example's updates in segment ``c`` cause. Self-influence is the
diagonal of the same form, ``sum_c <g_L, T_c g_c>`` (the example's own gradient at the final checkpoint as query).
The eval-set mix (TrackStar's lambda) is not used: ``H`` describes the training dynamics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .ekfac import EkfacCurvature, LayerEigenbasis
from .errors import PreconditionerError

# one factor of a layer's chain: ``M -> Q_S ((Q_S^T M Q_A) * diag) Q_A^T``
Factor = tuple[LayerEigenbasis, np.ndarray]


@dataclass(frozen=True)
class TrainingInterval:
    """The stretch of training a checkpoint ends: ``steps`` SGD steps (``K``) at lr ``lr`` (``eta``)."""

    name: str
    steps: int
    lr: float


def training_intervals(
    names: Sequence[str], steps: Sequence[int | None], lrs: Sequence[float]
) -> list[TrainingInterval]:
    """The intervals ending at each checkpoint: ``K_c = t_c - t_{c-1}``, ``t_0 = 0``; refused (clearly) when a step is
    missing, the steps do not increase, or an lr is negative."""
    if not names:
        raise PreconditionerError("preconditioner 'source' needs at least one checkpoint")
    lacking = [name for name, step in zip(names, steps, strict=True) if step is None]
    if lacking:
        raise PreconditionerError(
            f"preconditioner 'source' needs each checkpoint's training step (its segments are the intervals between "
            f"checkpoints), and checkpoints {lacking} have none; record the steps when logging ([[checkpoints]] "
            "step = ... in the run config, or log_checkpoint(..., step=...)), or use preconditioner 'ekfac'"
        )
    known = [int(step) for step in steps if step is not None]
    out, previous = [], 0
    for c, (name, step, lr) in enumerate(zip(names, known, lrs, strict=True)):
        if step < previous or (c > 0 and step == previous):
            raise PreconditionerError(
                f"preconditioner 'source' needs the checkpoints' steps to increase in index order (each one ends a "
                f"segment of training), got {dict(zip(names, steps))}; index the checkpoints in training order"
            )
        if not (math.isfinite(lr) and lr >= 0):
            raise PreconditionerError(f"preconditioner 'source' needs lr >= 0 at each checkpoint, {name!r} has {lr}")
        out.append(TrainingInterval(name, step - previous, float(lr)))
        previous = step
    return out


def interval_factors(
    curvature: EkfacCurvature, interval: TrainingInterval, damping: float
) -> dict[str, tuple[Factor, Factor]]:
    """Per layer, ``(F, S)``: ``F = (I - exp(-eta K H)) H^{-1}`` and ``S = exp(-eta K H)`` in ``H``'s eigenbasis."""
    out = {}
    for name, sigma in curvature.damped(damping).items():
        x = interval.lr * interval.steps * sigma
        # (1 - e^{-x}) / sigma, with its limit eta K where sigma is 0 (a layer without gradient)
        f = np.where(sigma > 0, -np.expm1(-x) / np.where(sigma > 0, sigma, 1.0), interval.lr * interval.steps)
        basis = curvature.bases[name]
        out[name] = ((basis, f), (basis, np.exp(-x)))
    return out


def source_chains(
    curvatures: Sequence[EkfacCurvature], schedule: Sequence[TrainingInterval], damping: float
) -> list[dict[str, list[Factor]]]:
    """Per checkpoint ``c``, per layer, the factors of ``T_c = S_L ... S_{c+1} F_c`` in the order they apply."""
    if len(curvatures) != len(schedule):
        raise PreconditionerError(f"{len(curvatures)} curvatures for {len(schedule)} segments")
    factors = [interval_factors(h, s, damping) for h, s in zip(curvatures, schedule)]
    chains = []
    for c, own in enumerate(factors):
        chains.append({name: [f] + [later[name][1] for later in factors[c + 1 :]] for name, (f, _) in own.items()})
    return chains
