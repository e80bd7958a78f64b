"""Typed store errors; messages say what went wrong and what to do next."""

from __future__ import annotations

from gradstore.projection.errors import GradstoreError, MessageKeyError


class StoreNotFoundError(GradstoreError, FileNotFoundError):
    """No gradient store at the given path."""


class StoreExistsError(GradstoreError, FileExistsError):
    """A store already exists where a new one was to be created."""


class StoreFormatError(GradstoreError, ValueError):
    """The store's metadata is missing, malformed, or from an unsupported format version."""


class StoreReadOnlyError(GradstoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class CheckpointNotFoundError(GradstoreError, MessageKeyError):
    """The named checkpoint is not in the store."""


class CheckpointMismatchError(GradstoreError, ValueError):
    """A checkpoint was reopened with metadata (lr, step, weights, examples) different from the stored ones."""


class DuplicateIdError(GradstoreError, ValueError):
    """The same example id occurs twice within one checkpoint."""


class UnknownExampleError(GradstoreError, MessageKeyError):
    """Requested example ids are not (completely) stored for a checkpoint."""


class GradientShapeError(GradstoreError, ValueError):
    """Rows written to the store have the wrong shape or dtype."""


class IndexNotFoundError(GradstoreError, FileNotFoundError):
    """No index beside the store (build one with ``gradstore index`` or ``GradientIndex.build``)."""


class StaleIndexError(GradstoreError, ValueError):
    """The store changed after the index was built; the index would silently mismatch it."""


class IndexMismatchError(GradstoreError, ValueError):
    """The index on disk was built with other options (kind, preconditioner, normalisation, checkpoints)."""


class StoreArgumentError(GradstoreError, ValueError):
    """An argument to create, open or write a store is invalid (dtype, chunk_rows, mode, checkpoint name or lr)."""


class IndexOptionsError(GradstoreError, ValueError):
    """``IndexOptions`` that cannot build or search an index (unknown kind or preconditioner, mix, damping, pq_m)."""


class QueryShapeError(GradstoreError, ValueError):
    """Query vectors whose shape does not fit the index (``[B, checkpoints, D]``)."""


class StoreCorruptError(StoreFormatError):
    """Stored rows are damaged (unreadable chunk, checksum mismatch, bad commit record); the message names them."""


class StoreLockedError(GradstoreError, TimeoutError):
    """Another ``gradstore index`` holds the store's index lock; the message says who (pid, host, since when)."""


class RemoteStoreError(GradstoreError, OSError):
    """A store or index URL that cannot be used: no fsspec driver, bad storage options, or an index that kept
    changing while it was downloaded."""


class DiskFullError(GradstoreError, OSError):
    """The device filled up (or a quota was reached) while writing a store or index file; nothing half-written is
    served: free space and run the command again (builds are swapped in whole, logging resumes)."""
