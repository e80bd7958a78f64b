"""Chunked Zarr storage of per-example projected gradients, and the FAISS index over them."""

from .batch_scoring import BatchScoringSummary, read_batch, score_batch
from .errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DiskFullError,
    DuplicateIdError,
    GradientShapeError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexOptionsError,
    QueryShapeError,
    RemoteStoreError,
    StaleIndexError,
    StoreArgumentError,
    StoreCorruptError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownExampleError,
)
from .gradient_store import CheckpointInfo, GradientStore, Segment, StoreDtype, file_sha256
from .index import GradientIndex, SearchResult, default_index_path
from .index_options import KINDS, IndexKind, IndexOptions
from .lock import index_lock, lock_path
from .remote import RemotePath, as_path
from .scoring import PreparedQueries, Scoring
from .writer import AppendWriter, BackgroundWriter, ChunkBuffer

__all__ = [
    "KINDS",
    "AppendWriter",
    "BackgroundWriter",
    "BatchScoringSummary",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ChunkBuffer",
    "DiskFullError",
    "DuplicateIdError",
    "GradientIndex",
    "GradientShapeError",
    "GradientStore",
    "IndexKind",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexOptions",
    "IndexOptionsError",
    "PreparedQueries",
    "QueryShapeError",
    "RemotePath",
    "RemoteStoreError",
    "Scoring",
    "SearchResult",
    "Segment",
    "StaleIndexError",
    "StoreArgumentError",
    "StoreCorruptError",
    "StoreDtype",
    "StoreExistsError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnknownExampleError",
    "as_path",
    "default_index_path",
    "file_sha256",
    "index_lock",
    "lock_path",
    "read_batch",
    "score_batch",
]
