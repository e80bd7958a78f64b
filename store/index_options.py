"""How an index is built and searched: :class:`IndexOptions`, and the index kinds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gradstore.projection import PRECONDITIONERS, PreconditionerKind

from .errors import IndexOptionsError

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq", "ivfsq"]
KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
ON_DISK_KINDS: tuple[IndexKind, ...] = ("ivf", "ivfsq", "ivfpq")
# Options that change the built vectors or FAISS structure; the others are search-time knobs.
BUILD_FIELDS = (
    "kind",
    "preconditioner",
    "normalize",
    "damping",
    "mix",
    "nlist",
    "hnsw_m",
    "ef_construction",
    "pq_m",
    "on_disk",
    "shards",
)


@dataclass(frozen=True)
class IndexOptions:
    """How to build and search the index. Defaults: exact flat search, no preconditioner.

    Each field's help string is in ``dataclasses.fields(IndexOptions)[i].metadata["help"]``.
    """

    kind: IndexKind = field(
        default="flat",
        metadata={
            "help": "flat: exact scan; ivf / hnsw / ivfpq / ivfsq (8-bit scalar quantizer): FAISS candidates "
            "re-scored exactly"
        },
    )
    preconditioner: PreconditionerKind = field(
        default="identity",
        metadata={
            "help": "curvature in projected space: identity, kfac, block, ekfac (eigenvalue-corrected KFAC) or "
            "source (SOURCE's segment-wise unrolling; needs checkpoint steps, queries at the final checkpoint)"
        },
    )
    normalize: bool = field(default=False, metadata={"help": "unit norm per checkpoint (cosine), as TrackStar"})
    damping: float = field(
        default=0.1,
        metadata={"help": "added to each inverted curvature matrix (ekfac, source: to H), times its mean eigenvalue"},
    )
    mix: float = field(
        default=0.99,
        metadata={
            "help": "TrackStar's lambda: R = mix * R_eval + (1 - mix) * R_train (eval store given; not for source)"
        },
    )
    nlist: int | None = field(
        default=None, metadata={"help": "ivf/ivfsq/ivfpq inverted lists (default about 4 sqrt(N))"}
    )
    nprobe: int | None = field(
        default=None, metadata={"help": "ivf/ivfsq/ivfpq lists visited per query (default nlist / 4)"}
    )
    hnsw_m: int = field(default=32, metadata={"help": "hnsw graph degree"})
    ef_construction: int = field(default=200, metadata={"help": "hnsw candidate list size while building"})
    ef_search: int = field(default=256, metadata={"help": "hnsw candidate list size while searching"})
    pq_m: int | None = field(
        default=None, metadata={"help": "ivfpq sub-quantizers (default: dim / 8, rounded to a divisor of dim)"}
    )
    on_disk: bool = field(
        default=False,
        metadata={
            "help": "ivf/ivfsq/ivfpq: inverted lists in a memory-mapped file (FAISS OnDiskInvertedLists), built in "
            "bounded memory; candidates re-read from the store"
        },
    )
    shards: int = field(
        default=1,
        metadata={
            "help": "split the rows into this many shards (contiguous row ranges, each a complete index of this kind "
            "with its own files), built in parallel and merged exactly at query time; 1: one unsharded index"
        },
    )
    rerank: int = field(default=10, metadata={"help": "approximate kinds re-score k * rerank candidates exactly"})
    train_rows: int = field(default=65536, metadata={"help": "ivf/ivfsq/ivfpq training sample (read block by block)"})
    block_rows: int = field(default=16384, metadata={"help": "rows streamed per step while building"})
    resident_mb: int = field(
        default=1024,
        metadata={
            "help": "flat: vectors taking at most this many MiB as float32 stay in memory (on the GPU when searching "
            "there), the fastest scan; larger indexes stream blocks from disk in bounded memory; 0: always stream"
        },
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IndexOptionsError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise IndexOptionsError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise IndexOptionsError(f"mix (lambda) must be in [0, 1], got {self.mix}")
        if self.damping <= 0:
            raise IndexOptionsError(f"damping must be positive (e.g. 0.1), got {self.damping}")
        if self.on_disk and self.kind not in ON_DISK_KINDS:
            raise IndexOptionsError(f"on_disk needs an inverted-list kind {ON_DISK_KINDS}, got kind={self.kind!r}")
        for name in ("nlist", "nprobe", "pq_m"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise IndexOptionsError(f"{name} must be a positive integer (or unset for the default), got {value}")
        if self.resident_mb < 0:
            raise IndexOptionsError(f"resident_mb must be 0 (always stream) or a positive size, got {self.resident_mb}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "rerank", "train_rows", "block_rows", "shards"):
            if getattr(self, name) < 1:
                raise IndexOptionsError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def build_key(self) -> dict[str, Any]:
        """The options an index on disk must have been built with to serve these options."""
        return {name: getattr(self, name) for name in BUILD_FIELDS}
