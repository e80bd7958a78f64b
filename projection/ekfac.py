"""EK-FAC (George et al. 2018) in projected space, fitted from stored per-example vectors.

A layer's projected gradient is the ``k_out x k_in`` matrix ``M`` (row-major in the stored vector). KFAC's factors
``S = E[M M^T]`` and ``A = E[M^T M]`` give the eigenbases ``S = Q_S diag(s) Q_S^T``, ``A = Q_A diag(a) Q_A^T``;
EK-FAC keeps the Kronecker eigenbasis ``Q = Q_S (x) Q_A`` but re-fits the eigenvalues from the examples in it,

    Lambda_ij = E[(Q_S^T M Q_A)_ij^2],      H_l = Q diag(vec Lambda) Q^T,

which is the diagonal of ``Q^T E[vec M vec M^T] Q``: the best approximation of the layer's second moment (block
``R_l``) with that eigenbasis (Frobenius norm). Its mean eigenvalue ``mean(Lambda) = E||M||^2 / k`` equals the block
``R_l``'s, so the damping rule is the one ``block`` uses: ``H_l + damping * mean(Lambda) I``.

Fitting takes two streaming passes: KFAC statistics (``CurvatureStats('kfac')``) for the bases, then
:class:`EigenvalueStats` in those bases. A function of ``H_l`` is applied without forming it, by
:func:`eigenbasis_apply`: ``M -> Q_S ((Q_S^T M Q_A) * F(Lambda)) Q_A^T`` costs ``k (k_out + k_in)`` per example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import PreconditionerError
from .spec import LayerSpec


@dataclass(frozen=True)
class LayerEigenbasis:
    """The Kronecker eigenbasis of one layer: eigenvectors (columns) of ``S`` and of ``A``."""

    q_s: np.ndarray  # [k_out, k_out]
    q_a: np.ndarray  # [k_in, k_in]


def eigenbasis_apply(m: np.ndarray, basis: LayerEigenbasis, diag: np.ndarray) -> np.ndarray:
    """``Q_S ((Q_S^T M Q_A) * diag) Q_A^T`` for each ``M`` of ``m`` ``[n, k_out, k_in]``: ``F(H) vec M`` where
    ``diag = F(Lambda)`` (``[k_out, k_in]``). The map is symmetric, so it is its own adjoint."""
    q_s, q_a = basis.q_s, basis.q_a
    return q_s @ ((q_s.T @ m @ q_a) * diag) @ q_a.T


def kronecker_eigenbases(kfac_means: Mapping[str, Sequence[np.ndarray]]) -> dict[str, LayerEigenbasis]:
    """Per layer, the eigenbases of the (possibly eval-mixed) KFAC means ``[S, A, E||M||^2]``."""
    out = {}
    for name, moments in kfac_means.items():
        s, a = moments[0], moments[1]
        out[name] = LayerEigenbasis(np.linalg.eigh((s + s.T) / 2)[1], np.linalg.eigh((a + a.T) / 2)[1])
    return out


@dataclass
class EigenvalueStats:
    """Running sums over examples of ``(Q_S^T M Q_A)^2`` per layer: the corrected eigenvalues' second pass."""

    layers: Sequence[LayerSpec]
    bases: Mapping[str, LayerEigenbasis]
    count: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in self.layers:
            if layer.name not in self.bases:
                raise PreconditionerError(f"no eigenbasis for layer {layer.name!r}; fit the KFAC factors first")
            self.sums[layer.name] = np.zeros((layer.k_out, layer.k_in))

    def update(self, vectors: np.ndarray) -> None:
        """Add a block of ``[n, D]`` projected gradients."""
        vectors = np.asarray(vectors, dtype=np.float64)
        self.count += len(vectors)
        for layer in self.layers:
            m = vectors[:, layer.slice].reshape(len(vectors), layer.k_out, layer.k_in)
            basis = self.bases[layer.name]
            self.sums[layer.name] += np.einsum("nab->ab", (basis.q_s.T @ m @ basis.q_a) ** 2)

    def means(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise PreconditionerError("cannot fit a preconditioner from zero examples; log gradients before indexing")
        return {name: s / self.count for name, s in self.sums.items()}


@dataclass(frozen=True)
class EkfacCurvature:
    """One checkpoint's EK-FAC curvature: per layer ``H_l = (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T``."""

    layers: Sequence[LayerSpec]
    bases: Mapping[str, LayerEigenbasis]
    eigenvalues: Mapping[str, np.ndarray]  # [k_out, k_in] per layer, undamped, >= 0

    @classmethod
    def fit(cls, train: EigenvalueStats, eval: EigenvalueStats | None = None, mix: float = 0.99) -> EkfacCurvature:
        """Eigenvalues ``E[(Q_S^T M Q_A)^2]``, mixed ``mix * eval + (1 - mix) * train`` when eval stats are given."""
        if not 0.0 <= mix <= 1.0:
            raise PreconditionerError(f"mix (lambda) must be in [0, 1], got {mix}")
        values = train.means()
        if eval is not None:
            if eval.bases is not train.bases:
                raise PreconditionerError("eval and train eigenvalues must be fitted in the same eigenbases")
            values = {name: mix * e + (1 - mix) * values[name] for name, e in eval.means().items()}
        return cls(train.layers, train.bases, values)

    def damped(self, damping: float) -> dict[str, np.ndarray]:
        """``Lambda + damping * mean(Lambda)`` per layer: the eigenvalues of ``H_l + damping * mean_eig(H_l) I``."""
        if damping <= 0:
            raise PreconditionerError(f"damping must be positive (e.g. 0.1), got {damping}")
        return {name: lam + damping * float(lam.mean()) for name, lam in self.eigenvalues.items()}

    def energies(self) -> dict[str, float]:
        """``E||M||^2 = sum(Lambda)`` per layer (the trace of ``H_l``)."""
        return {name: float(lam.sum()) for name, lam in self.eigenvalues.items()}
