"""Torch integration: the Task protocol, GradientProjector (hooks, no I/O) and GradientLogger (writes a store)."""

from .errors import (
    BatchLayoutError,
    CaptureError,
    ExactnessError,
    NonFiniteGradientError,
    TaskError,
    UnknownLayerError,
    UnsupportedLayerError,
)
from .gradient_logger import GradientLogger
from .projector import GradientProjector
from .selection import SelectedLayer, canonical_gradient, select_layers
from .task import Task, move_to_device

__all__ = [
    "BatchLayoutError",
    "CaptureError",
    "ExactnessError",
    "GradientLogger",
    "GradientProjector",
    "NonFiniteGradientError",
    "SelectedLayer",
    "Task",
    "TaskError",
    "UnknownLayerError",
    "UnsupportedLayerError",
    "canonical_gradient",
    "move_to_device",
    "select_layers",
]
