"""Pure math on tensors: Kronecker projections, the Adam correction, PCA bases, preconditioners (kfac, block,
EK-FAC, SOURCE). No I/O, no nn.Module."""

from .adam import fold_denominator, rank1_denominator
from .ekfac import EigenvalueStats, EkfacCurvature, LayerEigenbasis, eigenbasis_apply, kronecker_eigenbases
from .errors import (
    GradstoreError,
    LayerNotFoundError,
    PreconditionerError,
    ProjectionMismatchError,
    ProjectionSpecError,
)
from .kronecker import per_example_gradient, project_inputs, project_onehot_inputs, project_outputs
from .matrices import LayerMatrices, build_matrices, matrices_checksum, random_matrix
from .preconditioner import (
    KIND_TRAITS,
    PRECONDITIONERS,
    CurvatureStats,
    KindTraits,
    Preconditioner,
    PreconditionerKind,
    kind_traits,
    mixed_means,
    normalize_rows,
)
from .source import Segment, segment_factors, segments, source_chains
from .spec import INITS, LAYER_KINDS, Init, LayerKind, LayerSpec, ProjectionSpec

__all__ = [
    "INITS",
    "KIND_TRAITS",
    "LAYER_KINDS",
    "PRECONDITIONERS",
    "CurvatureStats",
    "EigenvalueStats",
    "EkfacCurvature",
    "GradstoreError",
    "Init",
    "KindTraits",
    "LayerEigenbasis",
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
    "Segment",
    "build_matrices",
    "eigenbasis_apply",
    "fold_denominator",
    "kind_traits",
    "kronecker_eigenbases",
    "matrices_checksum",
    "mixed_means",
    "normalize_rows",
    "per_example_gradient",
    "project_inputs",
    "project_onehot_inputs",
    "project_outputs",
    "random_matrix",
    "rank1_denominator",
    "segment_factors",
    "segments",
    "source_chains",
]
