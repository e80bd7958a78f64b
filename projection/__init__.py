"""Pure math on tensors: Kronecker projections, the Adam correction, PCA bases. No I/O, no nn.Module."""

from .adam import fold_denominator, rank1_denominator
from .errors import (
    GradstoreError,
    LayerNotFoundError,
    PreconditionerError,
    ProjectionMismatchError,
    ProjectionSpecError,
)
from .kronecker import per_example_gradient, project_inputs, project_onehot_inputs, project_outputs
from .matrices import LayerMatrices, build_matrices, matrices_checksum, random_matrix
from .preconditioner import PRECONDITIONERS, CurvatureStats, Preconditioner, PreconditionerKind, normalize_rows
from .spec import INITS, LAYER_KINDS, Init, LayerKind, LayerSpec, ProjectionSpec

__all__ = [
    "INITS",
    "LAYER_KINDS",
    "PRECONDITIONERS",
    "CurvatureStats",
    "GradstoreError",
    "Init",
    "LayerKind",
    "LayerMatrices",
    "LayerNotFoundError",
    "LayerSpec",
    "Preconditioner",
    "PreconditionerError",
    "PreconditionerKind",
    "ProjectionMismatchError",
    "ProjectionSpec",
    "ProjectionSpecError",
    "build_matrices",
    "fold_denominator",
    "matrices_checksum",
    "normalize_rows",
    "per_example_gradient",
    "project_inputs",
    "project_onehot_inputs",
    "project_outputs",
    "random_matrix",
    "rank1_denominator",
]
