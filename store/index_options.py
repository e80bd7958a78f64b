"""How an index is built and searched: :class:`BuildOptions` (what a build writes), :class:`SearchOptions` (how an
opened index is searched), :class:`IndexOptions` (both, the ``[index]`` table of ``run.toml``), and the index kinds."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from gradstore.projection import PRECONDITIONERS, PreconditionerKind

from .errors import IndexOptionsError

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq", "ivfsq"]
KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
ON_DISK_KINDS: tuple[IndexKind, ...] = ("ivf", "ivfsq", "ivfpq")


def _positive(options: object, names: tuple[str, ...], optional: bool = False) -> None:
    for name in names:
        value = getattr(options, name)
        if optional and value is None:
            continue
        if value < 1:
            unset = " (or unset for the default)" if optional else ""
            raise IndexOptionsError(f"{name} must be a positive integer{unset}, got {value}")


@dataclass(frozen=True)
class BuildOptions:
    """What a build writes: the vectors (preconditioner, normalisation) and the structure searched over them.

    Each field's help string is in ``dataclasses.fields(BuildOptions)[i].metadata["help"]``; fields marked
    ``metadata["keyed"] = False`` (``train_rows``, ``block_rows``) steer how a build runs, not what it must match.
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
    hnsw_m: int = field(default=32, metadata={"help": "hnsw graph degree"})
    ef_construction: int = field(default=200, metadata={"help": "hnsw candidate list size while building"})
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
    train_rows: int = field(
        default=65536,
        metadata={"help": "ivf/ivfsq/ivfpq training sample (read block by block)", "keyed": False},
    )
    block_rows: int = field(default=16384, metadata={"help": "rows streamed per step while building", "keyed": False})

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
        _positive(self, ("nlist", "pq_m"), optional=True)
        _positive(self, ("hnsw_m", "ef_construction", "train_rows", "block_rows", "shards"))

    def build_key(self) -> dict[str, Any]:
        """The options an index on disk must have been built with to serve these options."""
        return {name: getattr(self, name) for name in BUILD_FIELDS}


@dataclass(frozen=True)
class SearchOptions:
    """How an opened index is searched: knobs that need no rebuild (:meth:`GradientIndex.open`'s ``options``).

    Each field's help string is in ``dataclasses.fields(SearchOptions)[i].metadata["help"]``.
    """

    nprobe: int | None = field(
        default=None, metadata={"help": "ivf/ivfsq/ivfpq lists visited per query (default nlist / 4)"}
    )
    ef_search: int = field(default=256, metadata={"help": "hnsw candidate list size while searching"})
    rerank: int = field(default=10, metadata={"help": "approximate kinds re-score k * rerank candidates exactly"})
    resident_mb: int = field(
        default=1024,
        metadata={
            "help": "flat: vectors taking at most this many MiB as float32 stay in memory (on the GPU when searching "
            "there), the fastest scan; larger indexes stream blocks from disk in bounded memory; 0: always stream"
        },
    )

    def __post_init__(self) -> None:
        _positive(self, ("nprobe",), optional=True)
        if self.resident_mb < 0:
            raise IndexOptionsError(f"resident_mb must be 0 (always stream) or a positive size, got {self.resident_mb}")
        _positive(self, ("ef_search", "rerank"))


# Options that change the built vectors or FAISS structure: an index on disk must match them to be opened with them.
BUILD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BuildOptions) if f.metadata.get("keyed", True))
# IndexOptions' fields: the defaults and help of the part that owns each one
_B, _S = BuildOptions(), SearchOptions()
_META = {f.name: f.metadata for part in (BuildOptions, SearchOptions) for f in fields(part)}


@dataclass(frozen=True)
class IndexOptions:
    """How to build and search the index, in one: :class:`BuildOptions` and :class:`SearchOptions` (:attr:`build`,
    :attr:`search`, :meth:`of`). Defaults: exact flat search, no preconditioner.

    Each field's help string is in ``dataclasses.fields(IndexOptions)[i].metadata["help"]`` (its part's).
    """

    kind: IndexKind = field(default=_B.kind, metadata=_META["kind"])
    preconditioner: PreconditionerKind = field(default=_B.preconditioner, metadata=_META["preconditioner"])
    normalize: bool = field(default=_B.normalize, metadata=_META["normalize"])
    damping: float = field(default=_B.damping, metadata=_META["damping"])
    mix: float = field(default=_B.mix, metadata=_META["mix"])
    nlist: int | None = field(default=_B.nlist, metadata=_META["nlist"])
    nprobe: int | None = field(default=_S.nprobe, metadata=_META["nprobe"])
    hnsw_m: int = field(default=_B.hnsw_m, metadata=_META["hnsw_m"])
    ef_construction: int = field(default=_B.ef_construction, metadata=_META["ef_construction"])
    ef_search: int = field(default=_S.ef_search, metadata=_META["ef_search"])
    pq_m: int | None = field(default=_B.pq_m, metadata=_META["pq_m"])
    on_disk: bool = field(default=_B.on_disk, metadata=_META["on_disk"])
    shards: int = field(default=_B.shards, metadata=_META["shards"])
    rerank: int = field(default=_S.rerank, metadata=_META["rerank"])
    train_rows: int = field(default=_B.train_rows, metadata=_META["train_rows"])
    block_rows: int = field(default=_B.block_rows, metadata=_META["block_rows"])
    resident_mb: int = field(default=_S.resident_mb, metadata=_META["resident_mb"])

    def __post_init__(self) -> None:
        _ = self.build, self.search  # each part checks its own fields

    @classmethod
    def of(cls, build: BuildOptions, search: SearchOptions | None = None) -> IndexOptions:
        """Build and search options in one (``search`` unset: the defaults)."""
        return cls(**_values(build), **_values(search if search is not None else SearchOptions()))

    @property
    def build(self) -> BuildOptions:
        """The build part: what an index on disk was built with."""
        return BuildOptions(**{f.name: getattr(self, f.name) for f in fields(BuildOptions)})

    @property
    def search(self) -> SearchOptions:
        """The search part: what an opened index is searched with."""
        return SearchOptions(**{f.name: getattr(self, f.name) for f in fields(SearchOptions)})

    def build_key(self) -> dict[str, Any]:
        """The options an index on disk must have been built with to serve these options."""
        return {name: getattr(self, name) for name in BUILD_FIELDS}


def _values(options: BuildOptions | SearchOptions) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in fields(options)}


assert set(_META) == {f.name for f in fields(IndexOptions)}, "IndexOptions holds exactly the fields of its parts"
