"""Torch integration: the Task protocol, hooks, and the GradientLogger."""

from .errors import BatchLayoutError, NonFiniteGradientError, TaskError, UnknownLayerError, UnsupportedLayerError
from .gradient_logger import GradientLogger
from .layers import SelectedLayer, canonical_gradient, select_layers
from .task import Task, move_to_device

__all__ = [
    "BatchLayoutError",
    "GradientLogger",
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
