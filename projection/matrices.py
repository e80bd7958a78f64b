"""Deterministic projection matrices: the same (seed, layer, shape) gives the same bits anywhere.

Matrices are generated on the CPU with NumPy's PCG64 in float64 and rounded to float32, so the
device a run uses never changes the projection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ProjectionMismatchError, ProjectionSpecError
from .spec import Init, LayerSpec, ProjectionSpec


@dataclass(frozen=True)
class LayerMatrices:
    """``p_in``: ``k_in x in_dim`` (last column multiplies the bias input); ``p_out``: ``k_out x d_out``."""

    p_in: torch.Tensor
    p_out: torch.Tensor

    def to(self, device: torch.device | str) -> LayerMatrices:
        return LayerMatrices(self.p_in.to(device), self.p_out.to(device))


def _stream_seed(seed: int, layer: str, role: str, rows: int, cols: int) -> int:
    digest = hashlib.sha256(f"gradstore|{seed}|{layer}|{role}|{rows}x{cols}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _gaussian(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.standard_normal((rows, cols)) / np.sqrt(rows)


def _rademacher(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.integers(0, 2, size=(rows, cols)) * 2.0 - 1.0) / np.sqrt(rows)


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((cols, rows)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # unique QR: positive diagonal of R
    return q.T * np.sqrt(cols / rows)


# Every init but "pca", whose bases come from data (logger/pca.py) and travel in the spec.
_GENERATORS: dict[Init, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gaussian": _gaussian,
    "rademacher": _rademacher,
    "orthonormal": _orthonormal,
}


def random_matrix(init: Init, rows: int, cols: int, seed: int) -> np.ndarray:
    """A ``rows x cols`` float32 matrix with ``E[P^T P] = I`` (``rows <= cols``).

    gaussian: N(0, 1/rows); rademacher: +-1/sqrt(rows); orthonormal: orthonormal rows scaled by
    sqrt(cols/rows), so a square one is an exact isometry.
    """
    generator = _GENERATORS.get(init)
    if generator is None:
        raise ProjectionSpecError(
            f"no random generator for init {init!r}; use one of {tuple(_GENERATORS)} "
            "(init='pca' takes its bases from the data: ProjectionSpec.build(..., pca_bases=...))"
        )
    matrix = generator(np.random.Generator(np.random.PCG64(seed)), rows, cols)
    return np.ascontiguousarray(matrix, dtype=np.float32)


def layer_matrices(spec: ProjectionSpec, layer: LayerSpec) -> LayerMatrices:
    """Build one layer's pair of matrices (CPU, float32) from the spec."""
    if spec.init == "pca":
        p_in, p_out = spec.pca_bases[layer.name]
    else:
        in_seed = _stream_seed(spec.seed, layer.name, "in", layer.k_in, layer.in_dim)
        out_seed = _stream_seed(spec.seed, layer.name, "out", layer.k_out, layer.d_out)
        p_in = random_matrix(spec.init, layer.k_in, layer.in_dim, in_seed)
        p_out = random_matrix(spec.init, layer.k_out, layer.d_out, out_seed)
    return LayerMatrices(
        torch.from_numpy(np.array(p_in, dtype=np.float32)), torch.from_numpy(np.array(p_out, dtype=np.float32))
    )


def build_matrices(
    spec: ProjectionSpec, device: torch.device | str = "cpu", verify: bool = True
) -> dict[str, LayerMatrices]:
    """All layers' matrices, checked against ``spec.matrix_sha256`` when the spec carries one."""
    matrices = {layer.name: layer_matrices(spec, layer) for layer in spec.layers}
    if verify and spec.matrix_sha256 is not None:
        actual = matrices_checksum(matrices)
        if actual != spec.matrix_sha256:
            raise ProjectionMismatchError(
                "rebuilt projection matrices differ from the ones that wrote this store "
                f"(sha256 {actual[:12]} != {spec.matrix_sha256[:12]}); "
                "use the NumPy version the store was written with"
            )
    return {name: m.to(device) for name, m in matrices.items()}


def matrices_checksum(matrices: dict[str, LayerMatrices]) -> str:
    """sha256 of every layer's matrices (by layer name): the ``matrix_sha256`` a store's spec records."""
    digest = hashlib.sha256()
    for name in sorted(matrices):
        for tensor in (matrices[name].p_in, matrices[name].p_out):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
