"""Chunked Zarr storage of per-example projected gradients (and, later, their FAISS index)."""

from .errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DuplicateIdError,
    GradientShapeError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownExampleError,
)
from .gradient_store import CheckpointInfo, GradientStore, Part
from .writer import AppendWriter, BackgroundWriter, ChunkBuffer

__all__ = [
    "AppendWriter",
    "BackgroundWriter",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ChunkBuffer",
    "DuplicateIdError",
    "GradientShapeError",
    "GradientStore",
    "Part",
    "StoreExistsError",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnknownExampleError",
]
