"""Curvature preconditioners in projected space, estimated from stored gradient vectors.

TrackStar's ``G = R^{-1/2} g`` so that ``<G_q, G_i> = g_q^T R^{-1} g_i``, with a Gauss-Newton ``R``
estimated per layer from the per-example projected gradients themselves:

* ``identity``: ``R = I``.
* ``block``: ``R_l = E[g_l g_l^T]`` (full ``k x k`` per layer, ``k = k_out k_in``).
* ``kfac``: a layer's gradient is the ``k_out x k_in`` matrix ``M``; with ``S = E[M M^T]`` and
  ``A = E[M^T M]``, ``R_l = (S (x) A) / E||M||^2`` (the Kronecker factorisation whose traces match
  ``E[vec M vec M^T]``), applied as ``M -> sqrt(E||M||^2) S^{-1/2} M A^{-1/2}``.

With an eval set, each statistic is mixed ``lambda * eval + (1 - lambda) * train`` before damping.
Damping adds ``damping * mean eigenvalue`` to the diagonal of each matrix that is inverted
(``R_l`` for ``block``, ``S`` and ``A`` for ``kfac``). Everything is float64 numpy: fitting is a
one-off reduction and the transforms are small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import numpy as np

from .errors import PreconditionerError
from .spec import LayerSpec

PreconditionerKind = Literal["identity", "kfac", "block"]
PRECONDITIONERS: tuple[PreconditionerKind, ...] = get_args(PreconditionerKind)
# How many matrices each kind keeps per layer: block R^{-1/2}; kfac S^{-1/2} (scaled) and A^{-1/2}.
_TRANSFORMS_PER_LAYER: dict[PreconditionerKind, int] = {"identity": 0, "block": 1, "kfac": 2}


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
            elif self.kind == "kfac":
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
            elif self.kind == "kfac":
                m = g.reshape(len(g), layer.k_out, layer.k_in)
                s, a, sq = self.sums[layer.name]
                s += np.einsum("noi,npi->op", m, m)
                a += np.einsum("noi,noj->ij", m, m)
                self.sums[layer.name][2] = sq + np.einsum("noi,noi->", m, m)

    def means(self) -> dict[str, list[np.ndarray]]:
        if self.count == 0:
            raise PreconditionerError("cannot fit a preconditioner from zero examples; log gradients before indexing")
        return {name: [s / self.count for s in sums] for name, sums in self.sums.items()}


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
        """Fit from training statistics, optionally mixed with eval statistics as ``mix * eval + (1 - mix) * train``."""
        if train.kind == "identity":
            return cls.identity(train.layers)
        if not 0.0 <= mix <= 1.0:
            raise PreconditionerError(f"mix (lambda) must be in [0, 1], got {mix}")
        if damping <= 0:
            raise PreconditionerError(f"damping must be positive (e.g. 0.1), got {damping}")
        stats = train.means()
        if eval is not None:
            if eval.kind != train.kind:
                raise PreconditionerError(
                    f"eval statistics are {eval.kind!r}, train statistics {train.kind!r}; accumulate both with one kind"
                )
            stats = {
                name: [mix * e + (1 - mix) * t for t, e in zip(stats[name], eval_sums, strict=True)]
                for name, eval_sums in eval.means().items()
            }
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

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """``R^{-1/2} g`` for each row of ``[n, D]`` vectors (float32 in, float32 out; float64 math)."""
        if self.kind == "identity":
            return np.asarray(vectors, dtype=np.float32)
        vectors = np.asarray(vectors, dtype=np.float64)
        out = np.empty(vectors.shape, dtype=np.float32)
        for layer in self.layers:
            g = vectors[:, layer.slice]
            if self.kind == "block":
                (t,) = self.transforms[layer.name]
                out[:, layer.slice] = g @ t  # t is symmetric
            else:
                s_half, a_half = self.transforms[layer.name]
                m = g.reshape(len(g), layer.k_out, layer.k_in)
                out[:, layer.slice] = (s_half @ m @ a_half).reshape(len(g), layer.dim)
        if not np.isfinite(out).all():
            bad = [layer.name for layer in self.layers if not np.isfinite(out[:, layer.slice]).all()]
            raise PreconditionerError(
                f"the {self.kind} preconditioner gives non-finite vectors in layers {bad}; raise [index] damping"
            )
        return out

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
        try:
            transforms = {
                layer.name: [np.asarray(arrays[f"{prefix}/{layer.name}/{i}"]) for i in range(count)] for layer in layers
            }
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
