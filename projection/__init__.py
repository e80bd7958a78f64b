"""Pure math on tensors: Kronecker projections, the Adam correction, PCA bases. No I/O, no nn.Module."""

from .adam import fold_denominator, rank1_denominator
from .errors import GradstoreError, ProjectionMismatchError, ProjectionSpecError
from .kronecker import per_example_gradient, project_inputs, project_onehot_inputs, project_outputs
from .matrices import LayerMatrices, build_matrices, matrices_checksum, random_matrix
from .preconditioner import PRECONDITIONERS, CurvatureStats, Preconditioner, damped, normalize_rows
from .spec import INITS, LayerSpec, ProjectionSpec

__all__ = [
    "PRECONDITIONERS",
    "CurvatureStats",
    "Preconditioner",
    "damped",
    "normalize_rows",
    "INITS",
    "GradstoreError",
    "LayerMatrices",
    "LayerSpec",
    "ProjectionMismatchError",
    "ProjectionSpec",
    "ProjectionSpecError",
    "build_matrices",
    "fold_denominator",
    "matrices_checksum",
    "per_example_gradient",
    "project_inputs",
    "project_onehot_inputs",
    "project_outputs",
    "random_matrix",
    "rank1_denominator",
]
