"""Chunked Zarr storage of per-example projected gradients, and the FAISS index over them."""

from .errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DuplicateIdError,
    GradientShapeError,
    IndexMismatchError,
    IndexNotFoundError,
    StaleIndexError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownExampleError,
)
from .gradient_store import CheckpointInfo, GradientStore, Segment, file_sha256
from .index import KINDS, GradientIndex, IndexOptions, SearchResult, default_index_path
from .rows import CheckpointRows
from .writer import AppendWriter, BackgroundWriter, ChunkBuffer

__all__ = [
    "KINDS",
    "CheckpointRows",
    "GradientIndex",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexOptions",
    "SearchResult",
    "StaleIndexError",
    "default_index_path",
    "AppendWriter",
    "BackgroundWriter",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ChunkBuffer",
    "DuplicateIdError",
    "GradientShapeError",
    "GradientStore",
    "Segment",
    "StoreExistsError",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnknownExampleError",
    "file_sha256",
]
