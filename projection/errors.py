"""Exception hierarchy shared by every gradstore package.

Every error gradstore raises on purpose derives from ``GradstoreError`` and from the closest built-in, so
callers catch either ``GradstoreError`` (or one package's class) or the familiar ``ValueError`` /
``KeyError`` / ``FileNotFoundError``. Each package keeps its classes in its own ``errors.py``; the whole tree::

    GradstoreError
    │  projection/errors.py
    ├── ProjectionSpecError ........ ValueError         malformed spec: unknown init or layer kind, bad rank or offsets
    ├── ProjectionMismatchError .... ValueError         two projections that must be identical differ (spec, matrices)
    ├── PreconditionerError ........ ValueError         unknown kind, mix outside [0, 1], damping <= 0, zero examples
    ├── LayerNotFoundError ......... KeyError           a layer name the projection spec does not hold
    │  logger/errors.py
    ├── UnknownLayerError .......... ValueError         layer patterns matched no supported module
    ├── UnsupportedLayerError ...... ValueError         a selected module the Kronecker path cannot handle exactly
    │   └── ExactnessError ......... ValueError         first-batch rows differ from the exact per-example gradient
    ├── NonFiniteGradientError ..... FloatingPointError NaN/Inf projected gradients (``.ids`` lists the examples)
    ├── TaskError .................. ValueError         the user's Task broke its contract (e.g. loss shape)
    ├── BatchLayoutError ........... ValueError         a hooked module saw another batch size than the ids
    ├── CaptureError ............... ValueError         in-training capture used against its contract
    ├── OptimizerStateError ........ ValueError         optimizer state that cannot be matched or read as a moment
    ├── HFTaskError ................ ValueError         a model / checkpoint folder or data set CausalLMTask cannot use
    │  store/errors.py
    ├── StoreNotFoundError ......... FileNotFoundError  no gradient store at the path
    ├── StoreExistsError ........... FileExistsError    a store already exists where one was to be created
    ├── StoreFormatError ........... ValueError         store metadata missing, malformed or of another version
    │   └── StoreCorruptError ...... ValueError         stored rows damaged (unreadable chunk, checksum, commit record)
    ├── StoreReadOnlyError ......... PermissionError    a write to a store opened read-only
    ├── StoreArgumentError ......... ValueError         bad dtype, chunk_rows, mode, checkpoint name or lr
    ├── CheckpointNotFoundError .... KeyError           the named checkpoint is not in the store
    ├── CheckpointMismatchError .... ValueError         a checkpoint reopened with other metadata
    ├── DuplicateIdError ........... ValueError         an example id twice within one checkpoint
    ├── UnknownExampleError ........ KeyError           ids without (complete) rows at a checkpoint
    ├── GradientShapeError ......... ValueError         rows of the wrong shape or dtype
    ├── IndexNotFoundError ......... FileNotFoundError  no index beside the store
    ├── StaleIndexError ............ ValueError         the store changed after the index was built
    ├── IndexMismatchError ......... ValueError         the index was built with other options or another projection
    ├── IndexOptionsError .......... ValueError         invalid IndexOptions (kind, preconditioner, mix, pq_m, ...)
    ├── QueryShapeError ............ ValueError         query vectors whose shape does not fit the index
    ├── StoreLockedError ........... TimeoutError       another `gradstore index` holds the store's lock
    ├── RemoteStoreError ........... OSError            a store URL lacking its driver; index changed mid-fetch
    │   └── ShardUnavailableError .. OSError            an index shard's Ray Serve deployment did not answer
    ├── DiskFullError .............. OSError            the device filled up while writing a store or index file
    │  server/errors.py
    ├── QueryError ................. ValueError         a query the engine cannot answer as asked
    ├── ConfigError ................ ValueError         a run config (``run.toml``) or setting missing or invalid
    ├── EvaluationError ............ ValueError         an evaluation that cannot run as asked (no Task.train, bad file)
    └── GradstoreAPIError .......... RuntimeError       the HTTP server refused a request (``.status_code``)
        └── InvalidRequestError .... ValueError         the SDK refused it before sending (the request model, 422)

``KeyError`` subclasses print their message as given (``KeyError`` alone prints its repr): see
:class:`MessageKeyError`. The HTTP status of each error is in ``server/errors.py`` (``HTTP_STATUS``).
"""

from __future__ import annotations


class GradstoreError(Exception):
    """Base class of every error gradstore raises on purpose."""


class MessageKeyError(KeyError):
    """A ``KeyError`` whose ``str()`` is its message (a plain ``KeyError`` prints the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProjectionSpecError(GradstoreError, ValueError):
    """A projection spec is malformed, or asks for something the math cannot do."""


class ProjectionMismatchError(GradstoreError, ValueError):
    """Two projections that must be identical are not (different spec or rebuilt matrices)."""


class PreconditionerError(GradstoreError, ValueError):
    """A preconditioner cannot be fitted or loaded as asked (unknown kind, mix, damping, no examples, missing data)."""


class LayerNotFoundError(GradstoreError, MessageKeyError):
    """A layer name that the projection spec does not hold."""
