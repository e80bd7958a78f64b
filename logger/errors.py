"""Errors raised while hooking a model and computing per-example gradients."""

from __future__ import annotations

from gradstore.projection.errors import GradstoreError


class UnknownLayerError(GradstoreError, ValueError):
    """A layer pattern matched no supported module."""


class UnsupportedLayerError(GradstoreError, ValueError):
    """A selected module has a configuration the Kronecker path cannot handle exactly."""


class ExactnessError(UnsupportedLayerError):
    """The first-batch check found a logged block whose rows differ from the exact per-example gradient.

    ``layer``: the block's name; ``relative_error``: the worst relative error found; ``tolerance``: the bound.
    """

    def __init__(self, message: str, layer: str, relative_error: float, tolerance: float):
        super().__init__(message)
        self.layer, self.relative_error, self.tolerance = layer, relative_error, tolerance


class NonFiniteGradientError(GradstoreError, FloatingPointError):
    """Some examples produced NaN/Inf projected gradients; ``ids`` lists them."""

    def __init__(self, message: str, ids: list[int]):
        super().__init__(message)
        self.ids = ids


class TaskError(GradstoreError, ValueError):
    """The user's Task returned something that breaks its contract (e.g. losses of the wrong shape)."""


class BatchLayoutError(GradstoreError, ValueError):
    """A hooked module saw a batch dimension different from the number of example ids."""


class CaptureError(GradstoreError, ValueError):
    """In-training capture was used against its contract (no backward in the block, a changed lr, a bad reduction)."""


class OptimizerStateError(GradstoreError, ValueError):
    """An optimizer state that cannot be matched to the model's parameters or read as a second moment."""


class HFTaskError(GradstoreError, ValueError):
    """A model folder, checkpoint folder or data set that cannot be used as asked (no weights file, keys that do
    not fit the model, a ``trainer_state.json`` without what is needed, missing data); the message says what to do."""
