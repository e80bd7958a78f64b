"""The search index beside a store: preconditioned, optionally normalised per-checkpoint vectors, concatenated.

Row ``r`` of the index is example ``ids[r]`` (ids present in every indexed checkpoint, sorted); its
vector is ``[T_1 g_r,1, ..., T_C g_r,C]`` with ``T_c`` checkpoint ``c``'s preconditioner (and unit
normalisation). Learning-rate weights live on the query side, so a weighting or a checkpoint subset is
a query option: ``score = sum_c w_c <T_c q_c, T_c g_r,c>``.

Kinds: ``flat`` scans every row exactly (torch matmul, on the GPU when present) and also yields
mean/max |score|; ``ivf``, ``hnsw`` and ``ivfpq`` are FAISS indexes whose candidates
(``k * rerank`` of them) are re-scored exactly: ``hnsw`` and (on CPU) ``ivf`` from the exact float32
vectors they hold, ``ivfpq`` (and a GPU ``ivf``) by re-reading the candidates' rows from the Zarr store.

On disk (a directory, by default ``<store stem>.index`` beside the store)::

    manifest.json      options, checkpoints, dims, store fingerprint (written last)
    ids.npy            [N] example ids of the rows
    sqnorms.npy        [N, C] squared norms of the transformed vectors (self-influence)
    preconditioner.npz per-checkpoint per-layer transforms
    vectors.npy        flat: [N, C*D] float32
    faiss.index        ivf / hnsw / ivfpq

A build writes a temporary directory and swaps it in, so a crash never leaves a half-built index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from gradstore.projection import PRECONDITIONERS, CurvatureStats, Preconditioner, normalize_rows

from .errors import IndexMismatchError, IndexNotFoundError, StaleIndexError, StoreFormatError
from .gradient_store import GradientStore
from .rows import CheckpointRows

INDEX_FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]
# Options that change the built vectors or FAISS structure; the others are search-time knobs.
BUILD_FIELDS = ("kind", "preconditioner", "normalize", "damping", "mix", "nlist", "hnsw_m", "ef_construction", "pq_m")


@dataclass(frozen=True)
class IndexOptions:
    """How to build and search the index. Defaults: exact flat search, no preconditioner."""

    kind: IndexKind = "flat"
    preconditioner: Literal["identity", "kfac", "block"] = "identity"
    normalize: bool = False  # unit norm per checkpoint (cosine), as TrackStar
    damping: float = 0.1  # added to each inverted curvature matrix, times its mean eigenvalue
    mix: float = 0.99  # TrackStar's lambda: R = mix * R_eval + (1 - mix) * R_train (when an eval store is given)
    nlist: int | None = None  # ivf/ivfpq inverted lists (default about 4 sqrt(N))
    nprobe: int | None = None  # ivf/ivfpq lists visited per query (default nlist / 4)
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    pq_m: int | None = None  # ivfpq sub-quantizers (default: dim / 8, rounded to a divisor of dim)
    rerank: int = 10  # approximate kinds re-score k * rerank candidates exactly
    train_rows: int = 65536  # ivf/ivfpq training sample
    block_rows: int = 16384  # rows streamed per step while building

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix (lambda) must be in [0, 1], got {self.mix}")
        if self.damping <= 0:
            raise ValueError(f"damping must be positive, got {self.damping}")
        for name in ("nlist", "nprobe", "pq_m"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "rerank", "train_rows", "block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def build_key(self) -> dict:
        return {name: getattr(self, name) for name in BUILD_FIELDS}


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


def default_index_path(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_suffix(".index") if store_path.suffix else store_path.with_name(store_path.name + ".index")


def _pq_m(dim: int, requested: int | None) -> int:
    target = requested or max(1, dim // 8)
    if dim % target == 0:
        return target
    if requested:
        raise ValueError(f"pq_m={requested} must divide the index dimension {dim}")
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class GradientIndex:
    """A built index, loaded and checked against its store. Create with :meth:`build`, load with :meth:`open`."""

    def __init__(self, path: Path, store: GradientStore, manifest: dict, device: str | None = None):
        self.path, self.store, self.manifest = path, store, manifest
        self.options = IndexOptions(**manifest["options"])
        self.checkpoints: list[str] = list(manifest["checkpoints"])
        self.lrs: dict[str, float] = dict(zip(self.checkpoints, manifest["lrs"]))
        self.dim = store.dim
        self.ids = np.load(path / "ids.npy")
        self.sqnorms = np.load(path / "sqnorms.npy")
        arrays = dict(np.load(path / "preconditioner.npz"))
        self.preconditioners = {
            name: Preconditioner.from_arrays(self.options.preconditioner, store.spec.layers, arrays, name)
            if self.options.preconditioner != "identity"
            else Preconditioner.identity(store.spec.layers)
            for name in self.checkpoints
        }
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._vectors: torch.Tensor | None = None
        self._faiss = None
        self._exact_faiss = None  # a CPU FAISS index holding the exact vectors (hnsw, ivf): the re-rank reads them
        self._rows: dict[str, CheckpointRows] = {}
        if self.options.kind == "flat":
            self._vectors = torch.from_numpy(np.load(path / "vectors.npy")).to(self.device)
        else:
            index = faiss.read_index(str(path / "faiss.index"))
            self._set_search_params(index)
            self._faiss = index
            if self.options.kind == "hnsw":
                self._exact_faiss = index
            if self.options.kind in ("ivf", "ivfpq") and _gpu_available():
                try:
                    self._faiss = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
                except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
                    warnings.warn(f"FAISS GPU unavailable for this index ({exc}); searching on CPU", stacklevel=2)
            if self.options.kind == "ivf" and self._faiss is index:  # IVFFlat stores the exact float32 vectors
                faiss.extract_index_ivf(index).make_direct_map()
                self._exact_faiss = index

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store: GradientStore,
        options: IndexOptions = IndexOptions(),
        path: str | Path | None = None,
        checkpoints: Sequence[str] | None = None,
        eval_store: GradientStore | None = None,
        progress: bool = True,
    ) -> "GradientIndex":
        """Build (or replace) the index of ``store`` and return it loaded."""
        path = Path(path) if path is not None else default_index_path(store.path)
        checkpoints = list(checkpoints) if checkpoints is not None else store.checkpoints
        if not checkpoints:
            raise StoreFormatError(f"store {store.path} has no checkpoints to index; log some first")
        for name in checkpoints:
            store.checkpoint_info(name)  # raises CheckpointNotFoundError with the available names
        if options.preconditioner == "identity":
            eval_store = None  # R_eval only enters curvature preconditioners
        if eval_store is not None:
            eval_store.check_compatible(store.spec)
        rows = {name: CheckpointRows(store, name) for name in checkpoints}
        ids = _common_ids(rows)
        preconditioners = {
            name: _fit_preconditioner(store, eval_store, name, options, progress) for name in checkpoints
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        try:
            builder = _VectorBuilder(rows, preconditioners, options.normalize, store.dim)
            sqnorms = _write_vectors(builder, ids, options, tmp, progress)
            np.save(tmp / "ids.npy", ids)
            np.save(tmp / "sqnorms.npy", sqnorms)
            np.savez(tmp / "preconditioner.npz", **{k: v for name, p in preconditioners.items() for k, v in p.to_arrays(name).items()})
            manifest = {
                "format_version": INDEX_FORMAT_VERSION,
                "options": asdict(options),
                "checkpoints": checkpoints,
                "lrs": [store.checkpoint_info(name).lr for name in checkpoints],
                "dim": store.dim,
                "num_rows": int(len(ids)),
                "store_fingerprint": store.fingerprint(),
                "eval_store": str(eval_store.path) if eval_store is not None else None,
                "eval_fingerprint": eval_store.fingerprint() if eval_store is not None else None,
                "projection_fingerprint": store.spec.fingerprint(),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, store, options=options, eval_store=eval_store)

    @classmethod
    def rebuild(cls, path: str | Path, store: GradientStore, eval_store: GradientStore | None = None, progress: bool = True) -> "GradientIndex":
        """Build again with the options and checkpoints of the index at ``path`` (e.g. after the store grew)."""
        manifest = _read_manifest(Path(path))
        options = IndexOptions(**manifest["options"])
        return cls.build(store, options, path, manifest["checkpoints"], eval_store=eval_store, progress=progress)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path | None,
        store: GradientStore,
        options: IndexOptions | None = None,
        eval_store: GradientStore | None = None,
        device: str | None = None,
    ) -> "GradientIndex":
        """Load an index, refusing one whose store changed or whose build options differ from ``options``."""
        path = Path(path) if path is not None else default_index_path(store.path)
        manifest = _read_manifest(path)
        rebuild_hint = "rebuild it: `gradstore index --config ...` or GradientIndex.rebuild(path, store)"
        if manifest["projection_fingerprint"] != store.spec.fingerprint() or manifest["dim"] != store.dim:
            raise IndexMismatchError(f"index {path} was built for a store with another projection; {rebuild_hint}")
        if manifest["store_fingerprint"] != store.fingerprint():
            raise StaleIndexError(
                f"store {store.path} changed after index {path} was built (it indexed {manifest['num_rows']} rows of "
                f"checkpoints {manifest['checkpoints']}); {rebuild_hint}"
            )
        if manifest["options"]["preconditioner"] != "identity":
            if (eval_store is None) != (manifest["eval_fingerprint"] is None):
                raise IndexMismatchError(
                    f"index {path} was built {'with' if eval_store is None else 'without'} an eval store, "
                    f"now {'none is' if eval_store is None else 'one is'} given; {rebuild_hint}"
                )
            if eval_store is not None and manifest["eval_fingerprint"] != eval_store.fingerprint():
                raise StaleIndexError(f"eval store {eval_store.path} changed after index {path} was built; {rebuild_hint}")
        if options is not None:
            built = IndexOptions(**manifest["options"]).build_key()
            diffs = {k: (built[k], v) for k, v in options.build_key().items() if built[k] != v}
            if diffs:
                raise IndexMismatchError(f"index {path} was built with other options {diffs} (built, requested); {rebuild_hint}")
            manifest = {**manifest, "options": asdict(options)}  # search-time knobs come from the caller
        return cls(path, store, manifest, device=device)

    def _set_search_params(self, index) -> None:
        kind, o = self.options.kind, self.options
        if kind in ("ivf", "ivfpq"):
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = o.nprobe or max(1, ivf.nlist // 4)
        elif kind == "hnsw":
            index.hnsw.efSearch = o.ef_search

    # -- searching -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def prepare_queries(self, raw: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``[B, C, D]`` raw projected query gradients -> ``[B, C*D]`` transformed, normalised, weighted."""
        raw = np.asarray(raw, dtype=np.float32)
        b, c, d = raw.shape
        if c != len(self.checkpoints) or d != self.dim:
            raise ValueError(f"query vectors must have shape [B, {len(self.checkpoints)}, {self.dim}], got {list(raw.shape)}")
        out = np.zeros((b, c, d), dtype=np.float32)
        for j, name in enumerate(self.checkpoints):
            if weights[j] == 0:
                continue
            v = self.preconditioners[name].apply(raw[:, j])
            out[:, j] = (normalize_rows(v) if self.options.normalize else v) * np.float32(weights[j])
        return out.reshape(b, c * d)

    def search(self, raw: np.ndarray, weights: Sequence[float], k: int) -> SearchResult:
        """Top-``k`` proponents and opponents of each query, with exact scores and per-checkpoint contributions."""
        weights = np.asarray(weights, dtype=np.float64)
        queries = self.prepare_queries(raw, weights)
        k = min(k, self.num_rows)
        if self.options.kind == "flat":
            pro_rows, opp_rows, mean_abs, max_abs = self._scan(queries, k)
        else:
            mean_abs = max_abs = None
            candidates = min(self.num_rows, k * self.options.rerank)
            _, pro_rows = self._faiss.search(queries, candidates)
            _, opp_rows = self._faiss.search(-queries, candidates)
        # one fetch of the exact vectors of every candidate (all queries, proponents and opponents)
        fetched = np.unique(np.concatenate([pro_rows.ravel(), opp_rows.ravel()]))
        fetched = fetched[fetched >= 0]
        fetched = (fetched, self.exact_vectors(fetched))
        pro = self._rescore(queries, pro_rows, k, descending=True, fetched=fetched)
        opp = self._rescore(queries, opp_rows, k, descending=False, fetched=fetched)
        return SearchResult(*pro, *opp, mean_abs, max_abs)

    def _scan(self, queries: np.ndarray, k: int, block_rows: int = 1 << 18):
        q = torch.from_numpy(queries).to(self.device)
        vectors = self._vectors
        top_v, top_i, bot_v, bot_i = [], [], [], []
        abs_sum = torch.zeros(len(q), dtype=torch.float64, device=self.device)
        abs_max = torch.zeros(len(q), dtype=torch.float32, device=self.device)
        on_cpu = vectors.device.type == "cpu"
        for lo in range(0, len(vectors), block_rows):
            block = vectors[lo : lo + block_rows]
            # On CPU numpy's BLAS streams the block at about memory bandwidth; torch's CPU matmul measured
            # 1.5x slower for one query (1.2x for 64) on the benchmark machine (benchmarks/search.py).
            scores = torch.from_numpy(block.numpy() @ queries.T) if on_cpu else block @ q.T  # [n, B]
            kk = min(k, len(scores))
            v, i = scores.topk(kk, dim=0)
            top_v.append(v), top_i.append(i + lo)
            v, i = scores.topk(kk, dim=0, largest=False)
            bot_v.append(v), bot_i.append(i + lo)
            abs_scores = scores.abs()
            abs_sum += abs_scores.sum(0, dtype=torch.float64)
            abs_max = torch.maximum(abs_max, abs_scores.max(0).values)

        def merge(values, indices, largest):
            v, i = torch.cat(values), torch.cat(indices)
            sel = v.topk(k, dim=0, largest=largest).indices
            return torch.gather(i, 0, sel).T.cpu().numpy()

        return (
            merge(top_v, top_i, True),
            merge(bot_v, bot_i, False),
            (abs_sum / len(vectors)).cpu().numpy(),
            abs_max.double().cpu().numpy(),
        )

    def _rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int, descending: bool, fetched=None):
        """Exact float64 per-checkpoint contributions of the candidates; keep the best ``k`` of each query.

        ``fetched``: ``(sorted rows, their exact vectors)`` covering every candidate, else fetched here."""
        b = len(queries)
        c = len(self.checkpoints)
        rows_out = np.full((b, k), -1, dtype=np.int64)  # -1: fewer than k candidates were found
        scores_out = np.zeros((b, k))
        contrib_out = np.zeros((b, k, c))
        for j in range(b):
            rows = np.unique(candidates[j][candidates[j] >= 0])
            vectors = self.exact_vectors(rows) if fetched is None else fetched[1][np.searchsorted(fetched[0], rows)]
            vectors = vectors.astype(np.float64).reshape(len(rows), c, self.dim)
            contributions = np.einsum("ncd,cd->nc", vectors, queries[j].astype(np.float64).reshape(c, self.dim))
            scores = contributions.sum(1)
            order = np.lexsort((self.ids[rows], -scores if descending else scores))[:k]
            n = len(order)
            rows_out[j, :n], scores_out[j, :n], contrib_out[j, :n] = rows[order], scores[order], contributions[order]
        return rows_out, scores_out, contrib_out

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The exact ``[n, C*D]`` float32 vectors of index rows (from memory, the FAISS storage, or the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.options.kind == "flat":
            # index_select: tensor[index] costs ~20 ms per call on CPU here (torch 2.x), whatever the sizes
            return self._vectors.index_select(0, torch.from_numpy(rows).to(self.device)).cpu().numpy()
        if self._exact_faiss is not None:
            if not len(rows):
                return np.zeros((0, len(self.checkpoints) * self.dim), np.float32)
            return self._exact_faiss.reconstruct_batch(rows)
        if not self._rows:
            self._rows = {name: CheckpointRows(self.store, name) for name in self.checkpoints}
        builder = _VectorBuilder(self._rows, self.preconditioners, self.options.normalize, self.dim)
        return builder.vectors(self.ids[rows])[0]

    def self_influence(self, weights: Sequence[float]) -> np.ndarray:
        """``[N, C]`` per-checkpoint contributions ``w_c ||T_c g_i,c||^2`` to each example's self-influence."""
        return self.sqnorms * np.asarray(weights, dtype=np.float64)[None, :]

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GradientIndex({str(self.path)!r}, kind={o.kind}, preconditioner={o.preconditioner}, "
            f"normalize={o.normalize}, N={self.num_rows}, checkpoints={self.checkpoints})"
        )


# -- build helpers ---------------------------------------------------------------------------------
class _VectorBuilder:
    """Reads aligned rows of every checkpoint and turns them into index vectors."""

    def __init__(self, rows: dict[str, CheckpointRows], preconditioners: dict[str, Preconditioner], normalize: bool, dim: int):
        self.rows, self.preconditioners, self.normalize, self.dim = rows, preconditioners, normalize, dim

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``([n, C*D] float32 vectors, [n, C] float64 squared norms)`` for the given example ids."""
        segments, sqnorms = [], []
        for name, rows in self.rows.items():
            v = self.preconditioners[name].apply(rows.read(ids))
            if self.normalize:
                v = normalize_rows(v)
            segments.append(v)
            sqnorms.append(np.einsum("nd,nd->n", v.astype(np.float64), v.astype(np.float64)))
        return np.concatenate(segments, axis=1), np.stack(sqnorms, axis=1)

    def blocks(self, ids: np.ndarray, block_rows: int, desc: str, progress: bool) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        with tqdm(total=len(ids), desc=desc, unit="row", disable=not progress) as bar:
            for lo in range(0, len(ids), block_rows):
                vectors, sqnorms = self.vectors(ids[lo : lo + block_rows])
                yield lo, vectors, sqnorms
                bar.update(len(vectors))


def _common_ids(rows: dict[str, CheckpointRows]) -> np.ndarray:
    sets = [r.sorted_ids for r in rows.values()]
    common = sets[0]
    for s in sets[1:]:
        common = np.intersect1d(common, s, assume_unique=True)
    if len(common) == 0:
        raise StoreFormatError(f"no example has committed rows in every checkpoint {list(rows)}; nothing to index")
    dropped = {name: len(r) - len(common) for name, r in rows.items() if len(r) != len(common)}
    if dropped:
        warnings.warn(
            f"indexing the {len(common)} examples logged at every checkpoint; rows only some checkpoints have are left out "
            f"(per checkpoint: {dropped}). Finish logging (it resumes) and rebuild to include them.",
            stacklevel=3,
        )
    return common


def _fit_preconditioner(
    store: GradientStore, eval_store: GradientStore | None, checkpoint: str, options: IndexOptions, progress: bool
) -> Preconditioner:
    if options.preconditioner == "identity":
        return Preconditioner.identity(store.spec.layers)

    def stats(source: GradientStore, label: str) -> CurvatureStats:
        acc = CurvatureStats(options.preconditioner, store.spec.layers)
        total = source.num_rows(checkpoint)
        with tqdm(total=total, desc=f"{options.preconditioner} {label} {checkpoint}", unit="row", disable=not progress) as bar:
            for _, block in source.iter_blocks(checkpoint, block_rows=options.block_rows):
                acc.update(block)
                bar.update(len(block))
        return acc

    eval_stats = stats(eval_store, "eval") if eval_store is not None else None
    return Preconditioner.fit(stats(store, "train"), eval_stats, mix=options.mix, damping=options.damping)


def _write_vectors(builder: _VectorBuilder, ids: np.ndarray, options: IndexOptions, out: Path, progress: bool) -> np.ndarray:
    n = len(ids)
    dim = len(builder.rows) * builder.dim
    sqnorms = np.zeros((n, len(builder.rows)))
    if options.kind == "flat":
        vectors = np.lib.format.open_memmap(out / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for lo, block, sq in builder.blocks(ids, options.block_rows, "indexing (flat)", progress):
            vectors[lo : lo + len(block)] = block
            sqnorms[lo : lo + len(block)] = sq
        vectors.flush()
        del vectors
        return sqnorms
    index = _new_faiss_index(options, dim, n)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(ids, size=min(n, options.train_rows), replace=False))
        train = np.concatenate([b for _, b, _ in builder.blocks(sample, options.block_rows, f"training ({options.kind})", progress)])
        index.train(train)
        del train
    for lo, block, sq in builder.blocks(ids, options.block_rows, f"indexing ({options.kind})", progress):
        index.add(block)
        sqnorms[lo : lo + len(block)] = sq
    faiss.write_index(index, str(out / "faiss.index"))
    return sqnorms


def _new_faiss_index(options: IndexOptions, dim: int, n: int):
    ip = faiss.METRIC_INNER_PRODUCT
    if options.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, ip)
        index.hnsw.efConstruction = options.ef_construction
        return index
    nlist = options.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
    quantizer = faiss.IndexFlatIP(dim)
    if options.kind == "ivf":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    nbits = int(np.clip(np.log2(max(n, 1) / 39), 4, 8))  # k-means wants >= 39 training points per centroid
    return faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_m(dim, options.pq_m), nbits, ip)


def _read_manifest(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise IndexNotFoundError(f"no index at {path}; build it with `gradstore index --config ...` or GradientIndex.build(store)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexMismatchError(f"index manifest {manifest_path} is not valid JSON ({exc}); rebuild the index") from exc
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexMismatchError(
            f"index {path} has format version {manifest.get('format_version')!r}, expected {INDEX_FORMAT_VERSION}; rebuild it"
        )
    known = {f.name for f in dataclasses.fields(IndexOptions)}
    manifest["options"] = {k: v for k, v in manifest["options"].items() if k in known}
    return manifest


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the finished directory ``tmp`` (never leaving a half-built index at ``path``)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
