"""Curvature preconditioners in projected space, estimated from stored gradient vectors.

TrackStar's ``G = R^{-1/2} g`` so that ``<G_q, G_i> = g_q^T R^{-1} g_i``, with a Gauss-Newton ``R``
estimated per layer from the per-example projected gradients themselves:

* ``identity``: ``R = I``.
* ``block``: ``R_l = E[g_l g_l^T]`` (full ``k x k`` per layer, ``k = k_out k_in``).
* ``kfac``: a layer's gradient is the ``k_out x k_in`` matrix ``M``; with ``S = E[M M^T]`` and
  ``A = E[M^T M]``, ``R_l = (S (x) A) / E||M||^2`` (the Kronecker factorisation whose traces match
  ``E[vec M vec M^T]``), applied as ``M -> sqrt(E||M||^2) S^{-1/2} M A^{-1/2}``.
* ``ekfac``: ``R_l = Q diag(Lambda) Q^T`` in KFAC's eigenbasis ``Q = Q_S (x) Q_A`` with eigenvalues re-fitted from the
  examples, ``Lambda_ij = E[(Q_S^T M Q_A)_ij^2]`` (:mod:`.ekfac`), applied as
  ``M -> Q_S ((Q_S^T M Q_A) / sqrt(Lambda + delta)) Q_A^T``.
* ``source``: SOURCE's segment-wise unrolling (:mod:`.source`): an asymmetric form ``q_L^T T_c g_c``, the query at the
  final checkpoint only; training vectors map by ``T_c``, queries stay as they are (:attr:`KindTraits.final_query`).

With an eval set, each statistic is mixed ``lambda * eval + (1 - lambda) * train`` before damping (for ``ekfac``:
``S`` and ``A`` before their eigenbases are taken, and ``Lambda``; ``source`` ignores the eval set).
Damping adds ``damping * mean eigenvalue`` to the diagonal of each matrix that is inverted
(``R_l`` for ``block``, ``S`` and ``A`` for ``kfac``, ``R_l`` for ``ekfac``: ``delta = damping * mean(Lambda)``, the
same shift as ``block``'s since both have trace ``E||M||^2``). Everything is float64 numpy: fitting is a
one-off reduction and the transforms are small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import numpy as np

from .ekfac import EkfacCurvature, LayerEigenbasis, eigenbasis_apply
from .errors import PreconditionerError
from .source import TrainingInterval, source_chains
from .spec import LayerSpec

PreconditionerKind = Literal["identity", "kfac", "block", "ekfac", "source"]
PRECONDITIONERS: tuple[PreconditionerKind, ...] = get_args(PreconditionerKind)
# How many matrices each kind keeps per layer: block R^{-1/2}; kfac S^{-1/2} (scaled) and A^{-1/2}; ekfac and source
# (Q_S, Q_A, diag) per factor of their chain (one factor for ekfac, L - c + 1 for source's checkpoint c).
_TRANSFORMS_PER_LAYER: dict[PreconditionerKind, int] = {"identity": 0, "block": 1, "kfac": 2, "ekfac": 3, "source": 3}


@dataclass(frozen=True)
class KindTraits:
    """How a preconditioner kind enters an index and a query."""

    eval_mix: bool  # an eval store's statistics enter the curvature (TrackStar's lambda)
    final_query: bool  # the query gradient is taken at the final checkpoint only, the same in every checkpoint's slot
    lr_inside: bool  # the transform already holds each checkpoint's lr: only the `uniform` weighting makes sense
    two_pass: bool  # fitting reads each checkpoint's rows twice (bases, then eigenvalues)


KIND_TRAITS: dict[PreconditionerKind, KindTraits] = {
    "identity": KindTraits(eval_mix=False, final_query=False, lr_inside=False, two_pass=False),
    "kfac": KindTraits(eval_mix=True, final_query=False, lr_inside=False, two_pass=False),
    "block": KindTraits(eval_mix=True, final_query=False, lr_inside=False, two_pass=False),
    "ekfac": KindTraits(eval_mix=True, final_query=False, lr_inside=False, two_pass=True),
    "source": KindTraits(eval_mix=False, final_query=True, lr_inside=True, two_pass=True),
}


def kind_traits(kind: str) -> KindTraits:
    """The :class:`KindTraits` of a preconditioner kind (refusing an unknown one)."""
    return KIND_TRAITS[_check_kind(kind)]


@dataclass
class CurvatureStats:
    """Running sums over examples of one checkpoint's per-layer second moments."""

    kind: PreconditionerKind
    layers: Sequence[LayerSpec]
    count: int = 0
    sums: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        for layer in self.layers:
            if self.kind == "block":
                self.sums[layer.name] = [np.zeros((layer.dim, layer.dim))]
            elif self.kind != "identity":  # kfac, and the first (KFAC) pass of ekfac and source
                k_out, k_in = layer.k_out, layer.k_in
                # S = sum M M^T, A = sum M^T M, sum ||M||^2
                self.sums[layer.name] = [np.zeros((k_out, k_out)), np.zeros((k_in, k_in)), np.zeros(())]

    def update(self, vectors: np.ndarray) -> None:
        """Add a block of ``[n, D]`` projected gradients."""
        vectors = np.asarray(vectors, dtype=np.float64)
        self.count += len(vectors)
        for layer in self.layers:
            g = vectors[:, layer.slice]
            if self.kind == "block":
                self.sums[layer.name][0] += g.T @ g
            elif self.kind != "identity":
                m = g.reshape(len(g), layer.k_out, layer.k_in)
                s, a, sq = self.sums[layer.name]
                s += np.einsum("noi,npi->op", m, m)
                a += np.einsum("noi,noj->ij", m, m)
                self.sums[layer.name][2] = sq + np.einsum("noi,noi->", m, m)

    def means(self) -> dict[str, list[np.ndarray]]:
        if self.count == 0:
            raise PreconditionerError("cannot fit a preconditioner from zero examples; log gradients before indexing")
        return {name: [s / self.count for s in sums] for name, sums in self.sums.items()}


def mixed_means(train: CurvatureStats, eval: CurvatureStats | None, mix: float) -> dict[str, list[np.ndarray]]:
    """``mix * eval + (1 - mix) * train`` of each per-layer mean (the train means alone without eval statistics)."""
    if not 0.0 <= mix <= 1.0:
        raise PreconditionerError(f"mix (lambda) must be in [0, 1], got {mix}")
    stats = train.means()
    if eval is None:
        return stats
    if eval.kind != train.kind:
        raise PreconditionerError(
            f"eval statistics are {eval.kind!r}, train statistics {train.kind!r}; accumulate both with one kind"
        )
    return {
        name: [mix * e + (1 - mix) * t for t, e in zip(stats[name], eval_sums, strict=True)]
        for name, eval_sums in eval.means().items()
    }


DEAD_LAYER_FRACTION = 1e-12  # a layer whose E||g||^2 is below this fraction of the largest layer's is dropped


def _transform_dims(kind: str, layer: LayerSpec) -> tuple[int, ...]:
    return (layer.dim,) if kind == "block" else (layer.k_out, layer.k_in)


def _damped_inverse_sqrt(matrix: np.ndarray, damping: float) -> np.ndarray:
    """``(M + damping * mean_eig(M) I)^{-1/2}`` of a symmetric PSD matrix."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    eigvals = np.clip(eigvals, 0.0, None)
    shift = damping * max(float(eigvals.mean()), np.finfo(np.float64).tiny)
    return (eigvecs / np.sqrt(eigvals + shift)) @ eigvecs.T


def damped(matrix: np.ndarray, damping: float) -> np.ndarray:
    """``M + damping * mean_eig(M) I``: the matrix whose inverse the preconditioner applies (for references)."""
    shift = damping * max(float(np.trace(matrix)) / len(matrix), np.finfo(np.float64).tiny)
    return matrix + shift * np.eye(len(matrix))


@dataclass
class Preconditioner:
    """Per-layer transforms ``R_l^{-1/2}`` for one checkpoint; :meth:`apply` maps ``[n, D]`` vectors."""

    kind: PreconditionerKind
    layers: Sequence[LayerSpec]
    transforms: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def identity(cls, layers: Sequence[LayerSpec]) -> Preconditioner:
        return cls("identity", layers)

    @classmethod
    def fit(
        cls,
        train: CurvatureStats,
        eval: CurvatureStats | None = None,
        mix: float = 0.99,
        damping: float = 0.1,
    ) -> Preconditioner:
        """Fit from training statistics, optionally mixed with eval statistics as ``mix * eval + (1 - mix) * train``.

        ``ekfac`` and ``source`` need a second pass over the rows: see :meth:`ekfac` and :meth:`source`."""
        if train.kind == "identity":
            return cls.identity(train.layers)
        if kind_traits(train.kind).two_pass:
            raise PreconditionerError(
                f"a {train.kind} preconditioner needs eigenvalues fitted in a second pass; build it with "
                f"Preconditioner.{train.kind}(...) (store.vectors.fit_preconditioners does both passes)"
            )
        if not 0.0 <= mix <= 1.0:
            raise PreconditionerError(f"mix (lambda) must be in [0, 1], got {mix}")
        if damping <= 0:
            raise PreconditionerError(f"damping must be positive (e.g. 0.1), got {damping}")
        stats = mixed_means(train, eval, mix)
        energy = {name: float(np.trace(m[0])) if train.kind == "block" else float(m[2]) for name, m in stats.items()}
        floor = DEAD_LAYER_FRACTION * max(energy.values(), default=0.0)
        transforms = {}
        for name, moments in stats.items():
            if energy[name] <= floor:
                # A layer without training gradient (frozen by the data, a dead feature): the inverse of its zero
                # curvature would blow its query component up by ~1/sqrt(tiny) and turn scores into NaN or noise.
                # Its training vectors are zero, so dropping the layer on both sides changes no exact score.
                layer = next(spec for spec in train.layers if spec.name == name)
                transforms[name] = [np.zeros((d, d)) for d in _transform_dims(train.kind, layer)]
            elif train.kind == "block":
                transforms[name] = [_damped_inverse_sqrt(moments[0], damping)]
            else:
                s, a, sq = moments
                transforms[name] = [
                    _damped_inverse_sqrt(s, damping) * np.sqrt(max(float(sq), np.finfo(np.float64).tiny)),
                    _damped_inverse_sqrt(a, damping),
                ]
        return cls(train.kind, train.layers, transforms)

    @classmethod
    def ekfac(cls, curvature: EkfacCurvature, damping: float = 0.1) -> Preconditioner:
        """``M -> Q_S ((Q_S^T M Q_A) / sqrt(Lambda + damping * mean(Lambda))) Q_A^T`` per layer, so that
        ``<T q, T g> = q^T H^{-1} g`` with ``H`` the damped EK-FAC curvature. A layer without training gradient is
        dropped, as for ``kfac``."""
        damped_values = curvature.damped(damping)
        energy = curvature.energies()
        floor = DEAD_LAYER_FRACTION * max(energy.values(), default=0.0)
        transforms = {}
        for layer in curvature.layers:
            basis = curvature.bases[layer.name]
            if energy[layer.name] <= floor:
                scale = np.zeros((layer.k_out, layer.k_in))
            else:
                scale = 1.0 / np.sqrt(damped_values[layer.name])
            transforms[layer.name] = [basis.q_s, basis.q_a, scale]
        return cls("ekfac", curvature.layers, transforms)

    @classmethod
    def source(
        cls, curvatures: Sequence[EkfacCurvature], schedule: Sequence[TrainingInterval], damping: float = 0.1
    ) -> list[Preconditioner]:
        """SOURCE's training-side maps ``T_c = S_L ... S_{c+1} F_c``, one per checkpoint (in ``schedule`` order, which
        ends at the final checkpoint); see :mod:`.source` for the derivation."""
        out = []
        for chain in source_chains(curvatures, schedule, damping):
            transforms = {
                name: [a for basis, diag in factors for a in (basis.q_s, basis.q_a, diag)]
                for name, factors in chain.items()
            }
            out.append(cls("source", curvatures[0].layers, transforms))
        return out

    def _factors(self, layer: LayerSpec) -> list[tuple[LayerEigenbasis, np.ndarray]]:
        ts = self.transforms[layer.name]
        return [(LayerEigenbasis(ts[i], ts[i + 1]), ts[i + 2]) for i in range(0, len(ts), 3)]

    def _map(self, vectors: np.ndarray, adjoint: bool, dtype: type = np.float32) -> np.ndarray:
        """``T g`` (or ``T^T g``) of each float64 row, per layer, into a ``dtype`` array."""
        out: np.ndarray = np.empty(vectors.shape, dtype=dtype)
        for layer in self.layers:
            g = vectors[:, layer.slice]
            if self.kind == "block":
                (t,) = self.transforms[layer.name]
                out[:, layer.slice] = g @ t  # t is symmetric
                continue
            m = g.reshape(len(g), layer.k_out, layer.k_in)
            if self.kind == "kfac":
                s_half, a_half = self.transforms[layer.name]
                m = s_half.T @ m @ a_half.T if adjoint else s_half @ m @ a_half
            else:  # ekfac, source: a chain of symmetric eigenbasis maps; the adjoint applies them in reverse
                factors = self._factors(layer)
                for basis, diag in reversed(factors) if adjoint else factors:
                    m = eigenbasis_apply(m, basis, diag)
            out[:, layer.slice] = m.reshape(len(g), layer.dim)
        return out

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """The training-side map ``T g`` of each row of ``[n, D]`` vectors (``R^{-1/2} g`` for the symmetric kinds;
        SOURCE's ``T_c g``): float32 in, float32 out, float64 math."""
        if self.kind == "identity":
            return np.asarray(vectors, dtype=np.float32)
        out = self._map(np.asarray(vectors, dtype=np.float64), adjoint=False)
        if not np.isfinite(out).all():
            bad = [layer.name for layer in self.layers if not np.isfinite(out[:, layer.slice]).all()]
            raise PreconditionerError(
                f"the {self.kind} preconditioner gives non-finite vectors in layers {bad}; raise [index] damping"
            )
        return out

    def apply_query(self, vectors: np.ndarray) -> np.ndarray:
        """The query-side map: :meth:`apply` for the symmetric kinds, none for ``source`` (its form is
        ``q^T T_c g``)."""
        if kind_traits(self.kind).final_query:
            return np.asarray(vectors, dtype=np.float32)
        return self.apply(vectors)

    def adjoint(self, vector: np.ndarray) -> np.ndarray:
        """``T^T v`` (float64) of the training-side map, so that ``<v, T g> = <T^T v, g>``."""
        vector = np.asarray(vector, dtype=np.float64)
        if self.kind == "identity":
            return vector
        return self._map(vector[None], adjoint=True, dtype=np.float64)[0]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat ``{key: array}`` for saving (``np.savez``)."""
        return {f"{prefix}/{name}/{i}": t for name, ts in self.transforms.items() for i, t in enumerate(ts)}

    @classmethod
    def from_arrays(
        cls, kind: PreconditionerKind, layers: Sequence[LayerSpec], arrays: Mapping[str, np.ndarray], prefix: str
    ) -> Preconditioner:
        """Inverse of :meth:`to_arrays`."""
        count = _TRANSFORMS_PER_LAYER[_check_kind(kind)]
        if count == 0:
            return cls.identity(layers)
        transforms = {}
        for layer in layers:
            key = f"{prefix}/{layer.name}/"
            # source keeps a chain of (Q_S, Q_A, diag) factors, as many as the checkpoint has later segments, plus one
            n = sum(1 for k in arrays if k.startswith(key)) if kind == "source" else count
            n = max(count, n - n % count)
            try:
                transforms[layer.name] = [np.asarray(arrays[f"{key}{i}"]) for i in range(n)]
            except KeyError as exc:
                raise PreconditionerError(f"saved preconditioner is missing {exc}; rebuild the index") from None
        return cls(kind, layers, transforms)


def _check_kind(kind: str) -> PreconditionerKind:
    if kind not in PRECONDITIONERS:
        raise PreconditionerError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
    return cast(PreconditionerKind, kind)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-norm rows (cosine similarity); all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
