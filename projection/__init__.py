"""Pure math on tensors: Kronecker projections, the Adam correction, PCA bases, preconditioners (kfac, block,
EK-FAC, SOURCE). No I/O, no nn.Module.

Importing the package is cheap (``GradstoreError`` and the other errors, for code that only needs those, such as the
HTTP client): everything else is imported on first use (PEP 562), torch with it."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    GradstoreError,
    LayerNotFoundError,
    PreconditionerError,
    ProjectionMismatchError,
    ProjectionSpecError,
)

if TYPE_CHECKING:
    from .adam import fold_denominator, rank1_denominator
    from .ekfac import EigenvalueStats, EkfacCurvature, LayerEigenbasis, eigenbasis_apply, kronecker_eigenbases
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
    from .source import TrainingInterval, interval_factors, source_chains, training_intervals
    from .spec import INITS, LAYER_KINDS, Init, LayerKind, LayerSpec, ProjectionSpec

_MODULE_OF = {
    "fold_denominator": "adam",
    "rank1_denominator": "adam",
    "EigenvalueStats": "ekfac",
    "EkfacCurvature": "ekfac",
    "LayerEigenbasis": "ekfac",
    "eigenbasis_apply": "ekfac",
    "kronecker_eigenbases": "ekfac",
    "per_example_gradient": "kronecker",
    "project_inputs": "kronecker",
    "project_onehot_inputs": "kronecker",
    "project_outputs": "kronecker",
    "LayerMatrices": "matrices",
    "build_matrices": "matrices",
    "matrices_checksum": "matrices",
    "random_matrix": "matrices",
    "KIND_TRAITS": "preconditioner",
    "PRECONDITIONERS": "preconditioner",
    "CurvatureStats": "preconditioner",
    "KindTraits": "preconditioner",
    "Preconditioner": "preconditioner",
    "PreconditionerKind": "preconditioner",
    "kind_traits": "preconditioner",
    "mixed_means": "preconditioner",
    "normalize_rows": "preconditioner",
    "TrainingInterval": "source",
    "interval_factors": "source",
    "training_intervals": "source",
    "source_chains": "source",
    "INITS": "spec",
    "LAYER_KINDS": "spec",
    "Init": "spec",
    "LayerKind": "spec",
    "LayerSpec": "spec",
    "ProjectionSpec": "spec",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


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
    "TrainingInterval",
    "build_matrices",
    "eigenbasis_apply",
    "fold_denominator",
    "interval_factors",
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
    "source_chains",
    "training_intervals",
]
