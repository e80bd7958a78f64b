"""The search index beside a store: preconditioned, optionally normalised per-checkpoint vectors, concatenated.

Row ``r`` of the index is example ``ids[r]`` (ids present in every indexed checkpoint, sorted); its
vector is ``[T_1 g_r,1, ..., T_C g_r,C]`` with ``T_c`` checkpoint ``c``'s preconditioner (and unit
normalisation). Learning-rate weights live on the query side, so a weighting or a checkpoint subset is
a query option: ``score = sum_c w_c <T_c q_c, T_c g_r,c>``. For ``source`` the form is asymmetric, the query the
final checkpoint's gradient in every slot: ``score = sum_c w_c <q_L, T_c g_r,c>`` (projection/source.py).

The index kind picks a search backend (``store/search.py``): ``flat`` scans every row exactly and also yields
mean/max |score|; ``ivf``, ``hnsw`` and ``ivfpq`` are FAISS indexes whose candidates (``k * rerank`` of them)
are re-scored exactly here, from the exact vectors the backend holds or from the candidates' rows in the store.

On disk (a directory, by default ``<store stem>.index`` beside the store; format 3)::

    manifest.json                     options, checkpoints, dims, store fingerprint, row parts and parts (written last)
    ids.npy                           [N] example ids of the rows (row parts in order; each part's ids sorted)
    sqnorms.npy                       [N, C] self-influence terms, taken before normalisation
    preconditioners/<checkpoint>.npz  each checkpoint's per-layer transforms
    vectors/<checkpoint>/part-<r>.npy flat: [rows of row part r, D] in the store's dtype (float16 or float32)
    faiss.index                       ivf / hnsw / ivfpq

Rows come in *row parts*: a build writes one, each :meth:`GradientIndex.update` that finds new example ids appends
one. An update reuses every part whose inputs did not change (hard links of the same bytes) and writes the rest:

* ``identity``: exactly incremental; new rows are transformed alone, a new checkpoint gets its own parts.
* ``kfac`` / ``block`` / ``ekfac``: statistics are per checkpoint, so a new checkpoint is fitted alone and the
  others reused; a checkpoint whose rows changed (new examples logged there) is refitted on all its rows and all its
  parts re-transformed, so the result equals a fresh build (a kept transform would silently drift from it).
* ``source``: every checkpoint's transform chains the later ones, so any change rebuilds everything.
* FAISS kinds: new rows of unchanged checkpoints are added to the FAISS index (``add``: the trained quantiser is
  kept, recall as a fresh build's up to the quantiser's sample); any other change (a new checkpoint changes the
  concatenated dimension, a refitted one every vector) rebuilds the FAISS structure.
* sharded (``shards > 1``): every shard is kept byte for byte and new rows become one new shard, a complete unit of
  the index's kind built from them alone with the fitted transforms (flat: a row part; FAISS kinds: a FAISS index
  trained on them, ``shards/<s>/``), so the exact merge answers as a fresh sharded build. A refit, a new checkpoint,
  changed rows of a FAISS shard or too few new rows to train one build every shard again.

A build or update (:func:`build_index`, :func:`update_index`: written, not loaded) writes a temporary directory and
swaps it in, so a crash never leaves a half-built index, and :meth:`GradientIndex.open` reads one directory (through
a descriptor), so a reader sees the old or the new index.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch

from gradstore.projection import Preconditioner, PreconditionerKind, kind_traits

from .errors import IndexMismatchError, IndexNotFoundError, StoreFormatError
from .gradient_store import GradientStore
from .index_options import BUILD_FIELDS, KINDS, ON_DISK_KINDS, BuildOptions, IndexKind, IndexOptions, SearchOptions
from .manifest import REBUILD_HINT, IndexManifest, building, refuse_broken_chain
from .parts import part_name
from .remote import RemotePath, StorePath, as_path, fetch_index, local_index_dir, publish_index
from .rows import CheckpointRows
from .scoring import PreparedQueries, Scoring
from .search import BACKENDS, FlatBackend, SearchBackend, ivf_nlist
from .shards import ShardedBackend, shard_ranges
from .vectors import VectorSource, fit_preconditioners, indexed_ids

__all__ = [
    "BUILD_FIELDS",
    "KINDS",
    "BuildOptions",
    "GradientIndex",
    "IndexKind",
    "IndexOptions",
    "PreparedQueries",
    "Scoring",
    "SearchOptions",
    "SearchResult",
    "UpdateSummary",
    "build_index",
    "default_index_path",
    "update_index",
]


@dataclass
class SearchResult:
    """Per query: rows and exact scores of proponents (descending) and opponents (ascending), with contributions."""

    proponent_rows: np.ndarray  # [B, k]
    proponent_scores: np.ndarray  # [B, k] float64
    proponent_contributions: np.ndarray  # [B, k, C]
    opponent_rows: np.ndarray
    opponent_scores: np.ndarray
    opponent_contributions: np.ndarray
    mean_abs_score: np.ndarray | None  # [B] (flat only: needs every score)
    max_abs_score: np.ndarray | None


class _Ranked(NamedTuple):
    """The best ``k`` candidates of each query, exactly re-scored; ``-1`` rows pad when fewer were found."""

    rows: np.ndarray  # [B, k]
    scores: np.ndarray  # [B, k] float64
    contributions: np.ndarray  # [B, k, C] float64


class _Fetched(NamedTuple):
    """The exact vectors of a sorted set of rows, fetched once for every query's candidates."""

    rows: np.ndarray  # sorted, unique
    vectors: np.ndarray  # [len(rows), C*D] float32

    def of(self, rows: np.ndarray) -> np.ndarray:
        return self.vectors[np.searchsorted(self.rows, rows)]


def default_index_path(store_path: str | Path | RemotePath) -> StorePath:
    """``<store stem>.index`` beside the store (a URL beside a remote store)."""
    store_path = as_path(store_path)
    return store_path.with_suffix(".index") if store_path.suffix else store_path.with_name(store_path.name + ".index")


def _save_preconditioner(path: Path, name: str, preconditioner: Preconditioner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = preconditioner.to_arrays(name)
    np.savez(path, **arrays)


def _load_preconditioner(
    path: Path | bytes, kind: PreconditionerKind, store: GradientStore, name: str
) -> Preconditioner:
    """A checkpoint's preconditioner from its ``.npz`` (a path, or its already verified bytes)."""
    with np.load(io.BytesIO(path) if isinstance(path, bytes) else path) as arrays:
        return Preconditioner.from_arrays(kind, store.spec.layers, dict(arrays), name)


def _loaded_whole(manifest: IndexManifest) -> set[str]:
    """The files :class:`GradientIndex` reads whole at load (ids, sqnorms, preconditioners)."""
    return {"ids.npy", "sqnorms.npy", *(state["preconditioner_file"] for state in manifest.checkpoint_state.values())}


def _checkpoint_fingerprint(store: GradientStore, name: str) -> str:
    """Hash of a checkpoint's metadata and commit state in ``store`` (its rows change -> the hash changes)."""
    digest = hashlib.sha256(json.dumps(asdict(store.checkpoint_info(name)), sort_keys=True, default=str).encode())
    for segment in store.segments(name):
        digest.update(segment.name.encode())
        digest.update(segment.committed_counts().tobytes())
        digest.update(segment.checksum_records().tobytes())  # the rows' content, not only how many
        digest.update(segment.skipped_ids.tobytes())
    return digest.hexdigest()


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def _link(source: Path, target: Path) -> None:
    """``target`` the same bytes as ``source`` (a hard link; a copy where links are not possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def _snapshot(path: Path) -> Iterator[Path]:
    """A path that reaches the index directory ``path`` names now, also after an update swaps another one in."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield path  # IndexManifest.read says there is no index
        return
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        yield proc if proc.is_dir() else path
    finally:
        os.close(fd)


def _swapped(path: Path, snapshot: Path) -> bool:
    """Whether ``path`` now names another directory than ``snapshot`` (an update swapped in meanwhile)."""
    try:
        return snapshot != path and os.stat(snapshot).st_ino != os.stat(path).st_ino
    except OSError:
        return True


def _previous_part(previous: IndexManifest | None, name: str, row_part: int) -> dict[str, Any] | None:
    if previous is None or name not in previous.checkpoints or row_part >= len(previous.row_parts):
        return None
    return previous.part(name, row_part)


def _faiss_parts(
    previous: IndexManifest | None,
    path: Path,
    directory: Path,
    plan: dict[tuple[str, int], dict[str, Any]],
    checkpoints: list[str],
    row_parts: list[list[int]],
    source: VectorSource,
    ids: np.ndarray,
    options: IndexOptions,
    sqnorms: np.ndarray,
    progress: bool,
) -> tuple[str, int]:
    """The FAISS structure of an update: new rows added to the previous one when every earlier part holds, else
    built again. Fills ``sqnorms``; returns what was done and how many (row, checkpoint) vectors were computed."""
    backend = BACKENDS[options.kind]
    file = getattr(backend, "FILE", "faiss.index")
    old_parts = len(previous.row_parts) if previous is not None else 0
    if previous is None:
        why = "a full build"
    elif previous.checkpoints != checkpoints:
        why = "the checkpoints changed the concatenated dimension"
    elif not all(plan[(name, r)]["reused"] for name in checkpoints for r in range(old_parts)):
        why = "a checkpoint's transform or rows changed"
    elif not (path / file).is_file():
        why = f"{file} is missing"
    elif getattr(options, "on_disk", False) and not hasattr(backend, "append"):
        why = "on-disk inverted lists name their directory"  # faiss add would write into the old one
    else:
        start = previous.row_parts[-1][1] if previous.row_parts else 0
        new_ids = ids[start:]
        if not len(new_ids):
            _link(path / file, directory / file)
            return "unchanged", 0
        append = getattr(backend, "append", None)
        if append is not None:  # a backend whose files need more than faiss read/add/write
            sqnorms[start:] = append(path, source, new_ids, options, directory, progress)
        else:
            index = faiss.read_index(str(path / file))
            for block in source.blocks(new_ids, options.block_rows, f"adding ({options.kind})", progress):
                index.add(block.vectors)
                sqnorms[start + block.start : start + block.start + len(block.vectors)] = block.sqnorms
            faiss.write_index(index, str(directory / file))
        return f"added {len(new_ids)} rows", len(new_ids) * len(checkpoints)
    for part in plan.values():
        part["reused"] = False
    sqnorms[:] = backend.build(source, ids, options, directory, progress)
    return f"rebuilt ({why})", len(ids) * len(checkpoints)


def _shard_dir(shard: int) -> str:
    return f"shards/{shard:05d}"


def _train_rows_needed(options: IndexOptions, rows: int) -> int:
    """The fewest rows a FAISS index of ``options.kind`` over ``rows`` rows can be trained on (its k-means)."""
    if options.kind not in ON_DISK_KINDS:  # flat, hnsw: nothing to train
        return 1
    return max(ivf_nlist(options, rows), 16 if options.kind == "ivfpq" else 1)  # ivfpq: >= 2^4 codes


def _whole_shards_reason(
    previous: IndexManifest,
    options: IndexOptions,
    checkpoints: list[str],
    refit: list[str],
    plan: dict[tuple[str, int], dict[str, Any]],
    num_rows: int,
) -> str | None:
    """Why an update of a sharded index must build every shard again, or None when its shards are kept and the new
    rows become a shard of their own (each shard's vectors are fixed: same checkpoints, same transforms)."""
    if previous.checkpoints != checkpoints:
        added = [m for m in checkpoints if m not in previous.checkpoints]
        what = f"checkpoints {added} were added" if added else "its checkpoints changed"
        return f"{what}: every shard holds every checkpoint, so a sharded index is built whole (every shard again)"
    if refit:
        return (
            f"checkpoints {refit} are refitted ({options.preconditioner}: their rows changed), which changes every "
            "shard's vectors: a sharded index is built whole (every shard again)"
        )
    old_parts = len(previous.row_parts)
    if options.kind != "flat" and not all(plan[(m, r)]["reused"] for m in checkpoints for r in range(old_parts)):
        return "rows it holds changed in the store: a sharded FAISS index is built whole (every shard again)"
    new_rows = num_rows - (previous.row_parts[-1][1] if previous.row_parts else 0)
    if 0 < new_rows < _train_rows_needed(options, new_rows):
        return (
            f"{new_rows} new rows are too few to train a shard of their own ({options.kind}): a sharded index is built "
            "whole (every shard again)"
        )
    return None


def _in_parallel(fn: Callable[[int], int], items: Iterable[int], parallel: bool) -> list[int]:
    """``fn`` of every item: on a thread pool (one worker per CPU, FAISS and the BLAS release the GIL) when
    ``parallel``, else in turn."""
    items = list(items)
    if not parallel or len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(len(items), os.cpu_count() or 1), thread_name_prefix="gradstore-build") as pool:
        return list(pool.map(fn, items))


class UpdateSummary(NamedTuple):
    """What :func:`build_index` or :func:`update_index` did (:attr:`GradientIndex.changes` of a built or updated
    index)."""

    appended_rows: int  # examples added as a new row part
    checkpoints_added: list[str]  # checkpoints the previous index did not cover
    refitted: list[str]  # checkpoints whose preconditioner was fitted now (new, or their rows changed)
    parts_reused: int  # (checkpoint, row part) parts kept byte for byte
    parts_written: int
    vectors_computed: int  # (row, checkpoint) vectors transformed
    faiss: str | None  # FAISS kinds: "added N rows" or "rebuilt (why)"
    rebuilt: str | None  # why everything was built afresh (None: incremental)
    logged_rows: int = 0  # set by `gradstore index`: rows its logging pass computed
    num_rows: int = 0  # rows the index holds now
    checkpoints: tuple[str, ...] = ()  # checkpoints it covers now
    path: StorePath | None = None  # where it was written (build_index / update_index's path)
    seconds: float = 0.0  # wall time of the build or update (loading aside)
    shards: int = 0  # shards the index holds now (0: unsharded)
    shards_reused: int = 0  # shards kept byte for byte (an update of a sharded index: new rows are a new shard)

    def describe(self) -> str:
        """One line: ``appended 40 rows at 3 checkpoints; reused 3 parts`` and the like."""
        if self.rebuilt is not None:
            out = [f"built all {self.parts_written} parts ({self.rebuilt})"]
        else:
            out = [f"appended {self.appended_rows} rows"]
            if self.checkpoints_added:
                out.append(f"added checkpoints {self.checkpoints_added}")
            if self.refitted:
                out.append(f"refitted {self.refitted} (their rows changed)")
            out.append(f"reused {self.parts_reused} parts, wrote {self.parts_written}")
            if self.shards:
                out.append(f"kept {self.shards_reused} of {self.shards} shards")
        if self.faiss:
            out.append(f"faiss: {self.faiss}")
        return "; ".join(out)


def _index_options(options: BuildOptions | IndexOptions | None, search: SearchOptions | None = None) -> IndexOptions:
    """``options`` as :class:`IndexOptions` (build options with ``search``, else the default search options)."""
    if options is None:
        return IndexOptions.of(BuildOptions(), search)
    return IndexOptions.of(options, search) if isinstance(options, BuildOptions) else options


def build_index(
    store: GradientStore,
    options: BuildOptions | IndexOptions | None = None,
    path: str | StorePath | None = None,
    checkpoints: Sequence[str] | None = None,
    eval_store: GradientStore | None = None,
    progress: bool = True,
) -> UpdateSummary:
    """Build (or replace) the index of ``store`` at ``path`` (default: beside the store) and say what was done; the
    index is not loaded (:meth:`GradientIndex.open` loads it; :meth:`GradientIndex.build` does both).

    ``options``: :class:`BuildOptions` (default: its defaults), or :class:`IndexOptions`, whose search part the
    manifest records as the index's default search options (else :class:`SearchOptions`' defaults are recorded)."""
    start = time.perf_counter()
    target = as_path(path) if path is not None else default_index_path(store.path)
    local = local_index_dir(target)
    summary = _write_index(
        store, _index_options(options), local, checkpoints, eval_store, progress, None, "a full build"
    )
    publish_index(local, target)  # remote: built in the local cache, then uploaded (manifest last)
    return summary._replace(path=target, seconds=time.perf_counter() - start)


def update_index(
    path: str | StorePath,
    store: GradientStore,
    eval_store: GradientStore | None = None,
    checkpoints: Sequence[str] | None = None,
    options: BuildOptions | IndexOptions | None = None,
    progress: bool = True,
) -> UpdateSummary:
    """Bring the index at ``path`` up to date with ``store``, reusing what did not change, and say what was done; the
    index is not loaded (:meth:`GradientIndex.update` also opens it).

    New example ids (in every checkpoint's union) are transformed and appended as a new row part; a checkpoint
    in ``checkpoints`` (default: the index's) that the index lacks gets its own parts; the rest is reused as the
    module docstring's rule says (``identity`` exact; ``kfac`` / ``block`` / ``ekfac`` refit a checkpoint whose
    rows changed; ``source`` rebuilds); a sharded index keeps its shards and its new rows become a new shard (a
    refit or a new checkpoint builds every shard again). Other ``options`` (build-time ones), an index of another
    format version or ``source`` fall back to a full build; :class:`BuildOptions` keep the index's search options.
    The result equals :func:`build_index` on the same store (the row order aside: appended rows follow the earlier
    ones; a sharded index's search answers the same ids and scores).
    Built aside and swapped in, as builds are."""
    start = time.perf_counter()
    target = as_path(path)
    local = fetch_index(target)  # remote: the current index, downloaded into the local cache
    try:
        previous: IndexManifest | None = IndexManifest.read(local)
        assert previous is not None
        recorded, recorded_checkpoints = previous.options, previous.checkpoints
        reason = None
    except IndexMismatchError as exc:  # another format version or unreadable: build with what it records
        try:
            recorded, recorded_checkpoints = IndexManifest.read_request(local)
        except IndexMismatchError:
            if options is None or checkpoints is None:
                raise  # nothing says what to build
            recorded, recorded_checkpoints = _index_options(options), list(checkpoints)
        previous, reason = None, f"the index could not be extended: {exc}"
    chosen = recorded if options is None else _index_options(options, recorded.search)
    checkpoints = recorded_checkpoints if checkpoints is None else checkpoints
    if previous is not None:
        try:
            previous.check_files(local)  # a damaged part is built again, never reused
        except IndexMismatchError as exc:
            previous, reason = None, f"the index is damaged: {exc}"
    if previous is not None and chosen.build_key() != previous.options.build_key():
        previous, reason = None, "the build options changed"
    if previous is not None and chosen.preconditioner == "source":
        previous, reason = None, "source chains every checkpoint's transform"
    if previous is not None and (chosen.shards > 1) != bool(previous.shards):
        previous, reason = None, "its shards do not match options.shards"
    summary = _write_index(store, chosen, local, checkpoints, eval_store, progress, previous, reason)
    publish_index(local, target)
    return summary._replace(path=target, seconds=time.perf_counter() - start)


def _write_index(
    store: GradientStore,
    options: IndexOptions,
    path: Path,
    checkpoints: Sequence[str] | None,
    eval_store: GradientStore | None,
    progress: bool,
    previous: IndexManifest | None,
    reason: str | None,
) -> UpdateSummary:
    """Build the index at ``path``, reusing the parts of ``previous`` (the manifest there now) that still hold, and
    say what was done (nothing is loaded)."""
    checkpoints = list(checkpoints) if checkpoints is not None else store.checkpoints
    if not checkpoints:
        raise StoreFormatError(f"store {store.path} has no checkpoints to index; log some first")
    for name in checkpoints:
        store.checkpoint_info(name)  # raises CheckpointNotFoundError with the available names
    if not kind_traits(options.preconditioner).eval_mix:
        eval_store = None  # R_eval only enters curvature preconditioners (not identity, not source's dynamics)
    if eval_store is not None:
        eval_store.check_compatible(store.spec)
    if previous is not None and (
        previous.dim != store.dim or previous.projection_fingerprint != store.spec.fingerprint()
    ):
        previous, reason = None, "the store's projection changed"
    if previous is not None and (previous.eval_store is None) != (eval_store is None):
        previous, reason = None, "an eval store was added or removed"
    refuse_broken_chain(store)  # a missing record would drop rows from the index without a word
    if eval_store is not None:
        refuse_broken_chain(eval_store)
    # fingerprints first: rows committed while the index is built then make it stale instead of incomplete
    store_fingerprint, store_content = store.fingerprint(), store.content_fingerprint()
    eval_fingerprint = eval_store.fingerprint() if eval_store is not None else None
    states = {
        name: _checkpoint_fingerprint(store, name)
        + (":" + _checkpoint_fingerprint(eval_store, name) if eval_store is not None else "")
        for name in checkpoints
    }
    rows = {name: CheckpointRows(store, name) for name in checkpoints}
    union, missing = indexed_ids(rows)
    absent = {name: m["absent"] for name, m in missing.items() if m["absent"]}
    if absent:
        warnings.warn(
            f"{sum(absent.values())} example rows are absent (not logged) at some checkpoints, which then count "
            "them "
            f"as zero (per checkpoint: {absent}). Finish logging (it resumes) and rebuild to include them.",
            stacklevel=3,
        )
    old_ids = np.load(path / "ids.npy") if previous is not None else None
    if old_ids is not None and not np.isin(old_ids, union).all():
        previous, old_ids, reason = None, None, "rows the index holds are gone from the store"
    sharded = options.shards > 1

    def arrange(
        previous: IndexManifest | None, old_ids: np.ndarray | None
    ) -> tuple[np.ndarray, list[list[int]], list[list[int]], list[str], dict[tuple[str, int], dict[str, Any]]]:
        """The rows (ids, row parts, shards), the checkpoints to fit and which (checkpoint, row part) parts of
        ``previous`` still hold: same rows, same transform, same rows present there."""
        if previous is None or old_ids is None:
            # flat: a shard is its row parts' files; FAISS kinds: a whole FAISS index per shard (shards/<s>/)
            ids = union
            shards = shard_ranges(len(union), options.shards) if sharded else []
            row_parts = [list(r) for r in shards] if shards and options.kind == "flat" else [[0, len(union)]]
        else:
            new_ids = np.setdiff1d(union, old_ids, assume_unique=True)
            ids = np.concatenate([old_ids, new_ids])
            appended = [[len(old_ids), len(ids)]] if len(new_ids) else []
            row_parts = [list(r) for r in previous.row_parts] + appended
            # a sharded index keeps its shards; new rows are a shard of their own
            shards = [list(e["rows"]) for e in previous.shards] + appended if sharded else []
        prev_state = previous.checkpoint_state if previous is not None else {}
        refit = [
            name
            for name in checkpoints
            if name not in prev_state
            or (options.preconditioner != "identity" and prev_state[name]["fingerprint"] != states[name])
        ]
        plan: dict[tuple[str, int], dict[str, Any]] = {}
        for r, (start, stop) in enumerate(row_parts):
            part_ids = ids[start:stop]
            digest = _ids_digest(part_ids)
            for name in checkpoints:
                present = int(np.isin(part_ids, rows[name].sorted_ids, assume_unique=True).sum())
                entry = {
                    "checkpoint": name,
                    "row_part": r,
                    "rows": [start, stop],
                    "ids_blake2b": digest,
                    "content_blake2b": rows[name].content_digest(part_ids),
                    "present": present,
                    "file": part_name(name, r) if options.kind == "flat" else None,
                    "dtype": str(np.dtype(store.dtype)) if options.kind == "flat" else None,
                    "fitted_rows": rows[name].sorted_ids.size
                    if name in refit
                    else prev_state.get(name, {}).get("fitted_rows"),
                }
                old = _previous_part(previous, name, r)
                reuse = (  # keyed by the rows' content (chunk checksums), never by their ids alone
                    name not in refit
                    and old is not None
                    and old["ids_blake2b"] == digest
                    and old.get("content_blake2b") == entry["content_blake2b"]
                    and old["present"] == present
                )
                plan[(name, r)] = {**(old if reuse and old is not None else entry), "reused": reuse}
        return ids, row_parts, shards, refit, plan

    ids, row_parts, shards, refit, plan = arrange(previous, old_ids)
    if previous is not None and sharded:
        whole = _whole_shards_reason(previous, options, checkpoints, refit, plan, len(ids))
        if whole is not None:
            previous, old_ids, reason = None, None, whole
            ids, row_parts, shards, refit, plan = arrange(None, None)
    prev_state = previous.checkpoint_state if previous is not None else {}
    fitted = fit_preconditioners(store, eval_store, refit, options, progress) if refit else {}
    preconditioners = {
        name: fitted[name]
        if name in fitted
        else _load_preconditioner(path / prev_state[name]["preconditioner_file"], options.preconditioner, store, name)
        for name in checkpoints
    }
    kept_shards = len(previous.shards) if previous is not None and shards else 0
    n, c = len(ids), len(checkpoints)
    sqnorms = np.zeros((n, c))
    computed = 0
    faiss_note = None
    with building(path) as directory:
        if previous is not None:
            old_sq = np.load(path / "sqnorms.npy")
            for (name, _), part in plan.items():
                if part["reused"]:
                    start, stop = part["rows"]
                    sqnorms[start:stop, checkpoints.index(name)] = old_sq[start:stop, previous.checkpoints.index(name)]
                    if part["file"] is not None:
                        _link(path / part["file"], directory / part["file"])
        if options.kind == "flat":

            def write_part(r: int) -> int:
                start, stop = row_parts[r]
                todo = [name for name in checkpoints if not plan[(name, r)]["reused"]]
                if not todo:
                    return 0
                source = VectorSource(
                    {m: CheckpointRows(store, m) if shards else rows[m] for m in todo},  # a reader per thread
                    {m: preconditioners[m] for m in todo},
                    options.normalize,
                    store.dim,
                )
                part_sq, dtypes = FlatBackend.write_parts(
                    source, ids[start:stop], r, directory, np.dtype(store.dtype), options.block_rows, progress
                )
                for j, name in enumerate(todo):
                    sqnorms[start:stop, checkpoints.index(name)] = part_sq[:, j]
                    plan[(name, r)]["dtype"] = str(dtypes[name])
                return (stop - start) * len(todo)

            computed = sum(_in_parallel(write_part, range(len(row_parts)), parallel=bool(shards)))
        elif shards:
            backend = BACKENDS[options.kind]

            def build_shard(s: int) -> int:
                start, stop = shards[s]
                folder = directory / _shard_dir(s)
                folder.mkdir(parents=True)
                rows_here = {m: CheckpointRows(store, m) for m in checkpoints}  # a reader per thread
                source = VectorSource(rows_here, preconditioners, options.normalize, store.dim)
                sqnorms[start:stop] = backend.build(source, ids[start:stop], options, folder, progress)
                return (stop - start) * len(checkpoints)

            for s in range(kept_shards):  # a kept shard: every file of its folder, byte for byte
                for file in sorted((path / _shard_dir(s)).rglob("*")):
                    if file.is_file():
                        _link(file, directory / file.relative_to(path))
            computed = sum(_in_parallel(build_shard, range(kept_shards, len(shards)), parallel=True))
            faiss_note = f"built {len(shards) - kept_shards} shards" if len(shards) > kept_shards else "unchanged"
        else:
            source = VectorSource(rows, preconditioners, options.normalize, store.dim)
            faiss_note, computed = _faiss_parts(
                previous, path, directory, plan, checkpoints, row_parts, source, ids, options, sqnorms, progress
            )
        for name in checkpoints:
            target = f"preconditioners/{name}.npz"
            if name in fitted:
                _save_preconditioner(directory / target, name, fitted[name])
            else:
                _link(path / prev_state[name]["preconditioner_file"], directory / target)
        np.save(directory / "ids.npy", ids)
        np.save(directory / "sqnorms.npy", sqnorms)
        manifest = IndexManifest(
            options=options,
            checkpoints=checkpoints,
            lrs=[store.checkpoint_info(name).lr for name in checkpoints],
            dim=store.dim,
            num_rows=n,
            store_fingerprint=store_fingerprint,
            store_content=store_content,
            projection_fingerprint=store.spec.fingerprint(),
            eval_store=str(eval_store.path) if eval_store is not None else None,
            eval_fingerprint=eval_fingerprint,
            missing_rows=missing,
            row_parts=row_parts,
            parts=[{k: v for k, v in part.items() if k != "reused"} for part in plan.values()],
            shards=[
                {"shard": i, "rows": list(r), "dir": "" if options.kind == "flat" else _shard_dir(i)}
                for i, r in enumerate(shards)
            ],
            checkpoint_state={
                name: {
                    "fingerprint": states[name],
                    "rows": int(rows[name].sorted_ids.size),
                    "fitted_rows": int(rows[name].sorted_ids.size)
                    if name in fitted
                    else prev_state[name]["fitted_rows"],
                    "preconditioner_file": f"preconditioners/{name}.npz",
                }
                for name in checkpoints
            },
        )
        manifest.with_files(directory).write(directory)  # last: a directory with a manifest is a finished index
    reused = sum(part["reused"] for part in plan.values())
    shards_reused = kept_shards if options.kind != "flat" else 0
    if options.kind == "flat" and previous is not None:  # a flat shard is its row parts: kept when all of them are
        for lo, hi in shards[: len(previous.shards)]:
            inside = [r for r, (a, b) in enumerate(row_parts) if lo <= a and b <= hi]
            shards_reused += all(plan[(m, r)]["reused"] for m in checkpoints for r in inside)
    return UpdateSummary(
        appended_rows=0 if previous is None or old_ids is None else n - len(old_ids),
        checkpoints_added=[m for m in checkpoints if previous is not None and m not in previous.checkpoints],
        refitted=[m for m in fitted if previous is not None and m in previous.checkpoints],
        parts_reused=reused,
        parts_written=len(plan) - reused,
        vectors_computed=computed,
        faiss=faiss_note,
        rebuilt=reason if previous is None else None,
        num_rows=n,
        checkpoints=tuple(checkpoints),
        shards=len(shards),
        shards_reused=shards_reused,
    )


class GradientIndex:
    """A built index, loaded and checked against its store. Write it with :func:`build_index` / :func:`update_index`
    and load it with :meth:`open`; :meth:`build`, :meth:`update` and :meth:`rebuild` do both."""

    changes: UpdateSummary | None = None  # set on the index a build or update returns

    def __init__(
        self,
        path: Path,
        store: GradientStore,
        manifest: IndexManifest,
        device: str | None = None,
        files_at: Path | None = None,
        loader: Any = None,
    ):
        files_at = files_at if files_at is not None else path
        self.path, self.store, self.manifest = path, store, manifest
        self.options = manifest.options
        self.checkpoints: list[str] = list(manifest.checkpoints)
        self.lrs: dict[str, float] = dict(zip(self.checkpoints, manifest.lrs, strict=True))
        self.dim = store.dim

        def verified(name: str) -> bytes:  # what is held in memory is what was checked against the manifest
            return manifest.verified_bytes(files_at, name, label=path)

        self.ids = np.load(io.BytesIO(verified("ids.npy")))
        self._id_order = np.argsort(self.ids, kind="stable")  # rows by id: parts are sorted within, not across
        self.sqnorms = np.load(io.BytesIO(verified("sqnorms.npy")))
        self.preconditioners = {
            name: _load_preconditioner(
                verified(manifest.checkpoint_state[name]["preconditioner_file"]),
                self.options.preconditioner,
                store,
                name,
            )
            for name in self.checkpoints
        }
        self.scoring = Scoring(self.checkpoints, self.preconditioners, self.options.normalize)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loader = loader or (ShardedBackend if manifest.shards else BACKENDS[self.options.kind])
        self.backend: SearchBackend = loader.load(files_at, self.options, self.device, manifest=manifest, label=path)
        self._store_vectors: VectorSource | None = None  # reads exact vectors a backend does not hold

    # -- building (build_index / update_index, then open) ----------------------------------------
    @classmethod
    def build(
        cls,
        store: GradientStore,
        options: BuildOptions | IndexOptions | None = None,
        path: str | StorePath | None = None,
        checkpoints: Sequence[str] | None = None,
        eval_store: GradientStore | None = None,
        progress: bool = True,
    ) -> GradientIndex:
        """:func:`build_index`, then :meth:`open`: build (or replace) the index of ``store`` and return it loaded, with
        :attr:`changes` saying what was done. A job that does not search the index calls :func:`build_index`."""
        summary = build_index(store, options, path, checkpoints, eval_store, progress)
        return cls._opened(summary, store, eval_store)

    @classmethod
    def rebuild(
        cls, path: str | StorePath, store: GradientStore, eval_store: GradientStore | None = None, progress: bool = True
    ) -> GradientIndex:
        """Build again with the options and checkpoints of the index at ``path`` (any format version), then open."""
        options, checkpoints = IndexManifest.read_request(fetch_index(as_path(path)))
        return cls.build(store, options, path, checkpoints, eval_store=eval_store, progress=progress)

    @classmethod
    def update(
        cls,
        path: str | StorePath,
        store: GradientStore,
        eval_store: GradientStore | None = None,
        checkpoints: Sequence[str] | None = None,
        options: BuildOptions | IndexOptions | None = None,
        progress: bool = True,
    ) -> GradientIndex:
        """:func:`update_index`, then :meth:`open`: bring the index at ``path`` up to date with ``store``, reusing
        what did not change, and return it loaded, with :attr:`changes` saying what was done."""
        summary = update_index(path, store, eval_store, checkpoints, options, progress)
        return cls._opened(summary, store, eval_store)

    @classmethod
    def _opened(cls, summary: UpdateSummary, store: GradientStore, eval_store: GradientStore | None) -> GradientIndex:
        """The index a build or update just wrote (its options are the manifest's), loaded from this machine's copy."""
        assert summary.path is not None
        index = cls.open(local_index_dir(summary.path), store, eval_store=eval_store)
        index.changes = summary
        return index

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | StorePath | None,
        store: GradientStore,
        options: SearchOptions | IndexOptions | None = None,
        eval_store: GradientStore | None = None,
        device: str | None = None,
        loader: Any = None,
    ) -> GradientIndex:
        """Load an index, refusing one whose store changed or whose build options differ from ``options``
        (:class:`IndexOptions`; :class:`SearchOptions` only set how it is searched; None: as the manifest records).

        Every file is read from the one directory ``path`` named when the call began (an update that swaps a new
        one in meanwhile is seen on the next call). ``loader`` (``load`` and ``verified_on_load`` as a backend
        class has them) loads the backend in place of the kind's own: the Ray Serve shards of ``server/run``."""
        path = fetch_index(as_path(path) if path is not None else default_index_path(store.path))
        if not kind_traits(IndexManifest.read(path).options.preconditioner).eval_mix:
            eval_store = None  # built without one (source): an eval store beside the run does not change it
        for attempt in range(8):
            with _snapshot(path) as files_at:
                try:
                    manifest = IndexManifest.read(files_at, label=path)
                    manifest.check_store(path, store, eval_store)
                    searched = manifest.with_search_options(path, options)
                    # files the loaders read whole are checked on the very bytes they load, not hashed here too
                    chosen = loader or (ShardedBackend if searched.shards else BACKENDS[searched.options.kind])
                    skip = chosen.verified_on_load(searched) | _loaded_whole(manifest)
                    manifest.check_files(files_at, label=path, skip=skip)
                    return cls(path, store, searched, device, files_at=files_at, loader=loader)
                except (IndexMismatchError, IndexNotFoundError, OSError):
                    if attempt == 7 or not _swapped(path, files_at):
                        raise
                    # an update replaced (and removed) this directory while it was read: read the new one
        raise AssertionError("unreachable")

    def content_problems(self) -> list[str]:
        """One line per part whose recorded content (the checksums of the rows it was built from) differs from the
        store's rows now: an index that would answer with vectors of rows the store no longer holds."""
        lines = []
        rows: dict[str, CheckpointRows] = {}
        for part in self.manifest.parts:
            name, recorded = part["checkpoint"], part.get("content_blake2b")
            if recorded is None or name not in self.checkpoints:
                continue
            if name not in rows:
                rows[name] = CheckpointRows(self.store, name)
            start, stop = part["rows"]
            if rows[name].content_digest(self.ids[start:stop]) != recorded:
                lines.append(
                    f"index {self.path}: part {part['row_part']} of checkpoint {name!r} (rows {start}..{stop - 1}) was "
                    f"built from other rows than the store holds now; {REBUILD_HINT}"
                )
        return lines

    def row_of(self, example_id: int) -> int | None:
        """The index row of an example id, or None when the index does not hold it."""
        pos = int(np.searchsorted(self.ids, example_id, sorter=self._id_order))
        if pos >= len(self.ids) or self.ids[self._id_order[pos]] != example_id:
            return None
        return int(self._id_order[pos])

    # -- searching -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def final_query(self) -> bool:
        """Whether the query gradient is taken at the final checkpoint only (``source``; :class:`Scoring`)."""
        return self.scoring.final_query

    def query_checkpoints(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[C]`` bool: the checkpoints whose query gradients :meth:`prepare` reads for these weights."""
        return self.scoring.query_checkpoints(weights)

    def prepare(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray) -> PreparedQueries:
        """``[B, C, D]`` raw projected query gradients and explicit ``[C]`` weights -> prepared queries."""
        return self.scoring.prepare(raw, weights, self.dim)

    def prepare_queries(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """:meth:`prepare` as one ``[B, C*D]`` float32 array (transformed, normalised, weighted)."""
        return self.prepare(raw, weights).concatenated()

    def search(self, raw: np.ndarray, weights: Sequence[float] | np.ndarray, k: int) -> SearchResult:
        """Top-``k`` proponents and opponents of each query, with exact scores and per-checkpoint contributions."""
        return self.search_prepared(self.prepare(raw, weights), k)

    def search_prepared(self, queries: PreparedQueries, k: int) -> SearchResult:
        """:meth:`search` of already prepared queries."""
        k = min(k, self.num_rows)
        found = self.backend.candidates(queries, k)
        # one fetch of the exact vectors of every candidate (all queries, proponents and opponents)
        rows = np.unique(np.concatenate([found.proponent_rows.ravel(), found.opponent_rows.ravel()]))
        rows = rows[rows >= 0]
        fetched = _Fetched(rows, self.exact_vectors(rows))
        bad = ~np.isfinite(fetched.vectors).all(axis=1)
        if bad.any():  # bytes changed since load were read: the run's fault (503), not the query's
            raise IndexMismatchError(
                f"index {self.path} holds non-finite vectors (rows {rows[bad][:5].tolist()}): its files changed since "
                f"they were checked; `gradstore verify` names them; {REBUILD_HINT}"
            )
        pro = self._rescore(queries, found.proponent_rows, k, descending=True, fetched=fetched)
        opp = self._rescore(queries, found.opponent_rows, k, descending=False, fetched=fetched)
        return SearchResult(
            proponent_rows=pro.rows,
            proponent_scores=pro.scores,
            proponent_contributions=pro.contributions,
            opponent_rows=opp.rows,
            opponent_scores=opp.scores,
            opponent_contributions=opp.contributions,
            mean_abs_score=found.mean_abs_score,
            max_abs_score=found.max_abs_score,
        )

    def _rescore(
        self, queries: PreparedQueries, candidates: np.ndarray, k: int, descending: bool, fetched: _Fetched
    ) -> _Ranked:
        """Exact float64 per-checkpoint contributions of the candidates (:meth:`Scoring.contributions`); keep the
        best ``k`` of each query, ties broken by id."""
        b = queries.num_queries
        c = len(self.checkpoints)
        ranked = _Ranked(np.full((b, k), -1, dtype=np.int64), np.zeros((b, k)), np.zeros((b, k, c)))
        for j in range(b):
            rows = np.unique(candidates[j][candidates[j] >= 0])
            contributions = Scoring.row_contributions(queries, fetched.of(rows), query=j)
            scores = contributions.sum(1)
            order = np.lexsort((self.ids[rows], -scores if descending else scores))[:k]
            n = len(order)
            ranked.rows[j, :n] = rows[order]
            ranked.scores[j, :n] = scores[order]
            ranked.contributions[j, :n] = contributions[order]
        return ranked

    def score_rows(self, queries: PreparedQueries, rows: np.ndarray) -> np.ndarray:
        """``[B, n, C]`` exact float64 per-checkpoint contributions of index ``rows`` (evaluation, explain)."""
        return Scoring.contributions(queries, self.exact_vectors(rows))

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The exact ``[n, C*D]`` float32 vectors of index rows (from the backend, or re-read from the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        held = self.backend.exact_vectors(rows)
        if held is not None:
            return held
        if self._store_vectors is None:
            checkpoint_rows = {name: CheckpointRows(self.store, name) for name in self.checkpoints}
            self._store_vectors = VectorSource(checkpoint_rows, self.preconditioners, self.options.normalize, self.dim)
        return self._store_vectors.vectors(self.ids[rows]).vectors

    def self_influence(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[N, C]`` per-checkpoint contributions ``w_c ||T_c g_i,c||^2`` to each example's self-influence
        (``w_c <g_i,L, T_c g_i,c>`` for ``source``, whose query is the final checkpoint's gradient)."""
        return Scoring.self_influence(self.sqnorms, weights)

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GradientIndex({str(self.path)!r}, kind={o.kind}, preconditioner={o.preconditioner}, "
            f"normalize={o.normalize}, N={self.num_rows}, checkpoints={self.checkpoints})"
        )
